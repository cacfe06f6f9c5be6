//! `schedule` of a resource with `sync = "scheduled"`: when the standby catches up. Pure: the
//! next run after a given time, in any time zone (the daemon passes the local one).
//!
//! The forms: `every N minutes` / `every N hours` (`every 30m`, `every 2h`: at the multiples of
//! N since midnight), `hourly` (at minute 0), `daily HH:MM`, `weekly DAY HH:MM` (`mon` … `sun`).
//! A local time that a clock change skips runs at the first minute after the gap; one it
//! repeats runs once, at its first occurrence.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Timelike, Weekday};

/// When the catch-up runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every `minutes` minutes (a divisor of a day is not required: the count restarts at
    /// midnight).
    Every { minutes: u32 },
    /// At minute 0 of every hour.
    Hourly,
    /// Every day at this local time.
    Daily { at: NaiveTime },
    /// Every week on `day` at this local time.
    Weekly { day: Weekday, at: NaiveTime },
}

/// Why a schedule did not parse (the text says what the forms are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0}; use \"every 30m\", \"every 2h\", \"hourly\", \"daily 02:00\" or \"weekly sun 03:30\" (local time)"
)]
pub struct BadSchedule(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, BadSchedule> {
    Err(BadSchedule(why.into()))
}

fn time(s: &str) -> Result<NaiveTime, BadSchedule> {
    let Some((h, m)) = s.split_once(':') else {
        return bad(format!("{s:?} is not a time of day HH:MM"));
    };
    let digits = |t: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return bad(format!("{s:?} is not a time of day HH:MM"));
    }
    let (Ok(h), Ok(m)) = (h.parse::<u32>(), m.parse::<u32>()) else {
        return bad(format!("{s:?} is not a time of day HH:MM"));
    };
    if h > 23 || m > 59 {
        return bad(format!("{s:?} is not a time of day from 00:00 to 23:59"));
    }
    NaiveTime::from_hms_opt(h, m, 0).map_or_else(|| bad(format!("{s:?} is not a time")), Ok)
}

impl std::str::FromStr for Schedule {
    type Err = BadSchedule;

    fn from_str(s: &str) -> Result<Self, BadSchedule> {
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            ["hourly"] => Ok(Self::Hourly),
            ["daily", t] => Ok(Self::Daily { at: time(t)? }),
            ["weekly", d, t] => {
                let Ok(day) = d.parse::<Weekday>() else {
                    return bad(format!("{d:?} is not a day of the week"));
                };
                Ok(Self::Weekly { day, at: time(t)? })
            }
            ["every", n] | ["every", n, _] => {
                let (num, unit) = match words.as_slice() {
                    ["every", _, u] => (*n, *u),
                    _ => {
                        let cut = n.find(|c: char| !c.is_ascii_digit()).unwrap_or(n.len());
                        (&n[..cut], &n[cut..])
                    }
                };
                let Ok(v) = num.parse::<u32>() else {
                    return bad(format!("{num:?} is not a whole number"));
                };
                let per = match unit {
                    "m" | "min" | "minute" | "minutes" => 1,
                    "h" | "hour" | "hours" => 60,
                    u => return bad(format!("{u:?} is not a unit (minutes or hours)")),
                };
                let minutes = v.saturating_mul(per);
                if !(1..=24 * 60).contains(&minutes) {
                    return bad(format!("{s:?}: the interval must be from 1 minute to 24 hours"));
                }
                Ok(Self::Every { minutes })
            }
            [] => bad("empty"),
            _ => bad(format!("{s:?} is not a schedule")),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Every { minutes } => write!(f, "every {minutes} minutes"),
            Self::Hourly => f.write_str("hourly"),
            Self::Daily { at } => write!(f, "daily {}", at.format("%H:%M")),
            Self::Weekly { day, at } => write!(f, "weekly {day} {}", at.format("%H:%M")),
        }
    }
}

impl Schedule {
    /// The first run strictly after `t`.
    pub fn next_after<Tz: TimeZone>(&self, t: &DateTime<Tz>) -> DateTime<Tz> {
        let tz = t.timezone();
        let local = t.naive_local();
        let day = local.date();
        // Candidate local times from today on, in order; the first one after `t` wins.
        for d in 0..9i64 {
            let date = day + Duration::days(d);
            for at in self.times_on(date) {
                if let Some(c) = resolve(&tz, date, at)
                    && c > *t
                {
                    return c;
                }
            }
        }
        // Unreachable for every schedule (a week and a day hold a run of each); a day later
        // is a safe answer all the same.
        t.clone() + Duration::days(1)
    }

    /// [`Schedule::next_after`] in UTC, in seconds since the epoch (`None` outside chrono's
    /// range): for callers without a time zone at hand (the fuzz target).
    pub fn next_after_utc(&self, epoch_s: i64) -> Option<i64> {
        let t = chrono::DateTime::from_timestamp(epoch_s, 0)?;
        Some(self.next_after(&t).timestamp())
    }

    /// The local times of runs on `date`, in order.
    fn times_on(&self, date: NaiveDate) -> Vec<NaiveTime> {
        let hm = |m: u32| NaiveTime::from_hms_opt(m / 60, m % 60, 0).expect("within a day");
        match *self {
            Self::Every { minutes } => (0..24 * 60).step_by(minutes as usize).map(hm).collect(),
            Self::Hourly => (0..24).map(|h| hm(h * 60)).collect(),
            Self::Daily { at } => vec![at],
            Self::Weekly { day, at } => {
                if date.weekday() == day {
                    vec![at]
                } else {
                    vec![]
                }
            }
        }
    }
}

/// The instant of a local time: its first occurrence when a clock change repeats it, the
/// first minute after the gap when one skips it.
fn resolve<Tz: TimeZone>(tz: &Tz, date: NaiveDate, at: NaiveTime) -> Option<DateTime<Tz>> {
    let mut t = date.and_time(at);
    for _ in 0..=180 {
        if let Some(c) = tz.from_local_datetime(&t).earliest() {
            return Some(c);
        }
        t += Duration::minutes(1);
        if t.minute() == 0 && t.hour() == 0 {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Utc};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("test time").with_timezone(&Utc)
    }

    #[test]
    fn each_form_parses_and_prints_back() {
        for (text, want) in [
            ("every 30m", "every 30 minutes"),
            ("every 30 minutes", "every 30 minutes"),
            ("every 2h", "every 120 minutes"),
            ("every 1 hour", "every 60 minutes"),
            ("hourly", "hourly"),
            ("daily 02:00", "daily 02:00"),
            ("weekly sun 03:30", "weekly Sun 03:30"),
            ("  daily   23:59 ", "daily 23:59"),
        ] {
            let s: Schedule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.to_string(), want);
            assert_eq!(s.to_string().parse::<Schedule>(), Ok(s), "{want} parses back");
        }
    }

    #[test]
    fn nonsense_is_refused_with_the_forms() {
        for text in [
            "",
            "sometimes",
            "every",
            "every 0m",
            "every 25h",
            "every -1m",
            "every 5 fortnights",
            "every 99999999999m",
            "daily",
            "daily 24:00",
            "daily 12:60",
            "daily 1200",
            "daily 12:005",
            "daily 12:5",
            "daily +1:00",
            "weekly funday 01:00",
            "weekly mon",
            "hourly 5",
        ] {
            let e = text.parse::<Schedule>().expect_err(text);
            assert!(e.to_string().contains("\"daily 02:00\""), "{text}: {e}");
        }
    }

    #[test]
    fn the_next_run_is_strictly_later() {
        let s = |t: &str| t.parse::<Schedule>().expect("schedule");
        let n = |sch: &str, t: &str| s(sch).next_after(&at(t)).to_rfc3339();
        assert_eq!(n("every 30m", "2026-12-03T10:05:00Z"), "2026-12-03T10:30:00+00:00");
        assert_eq!(n("every 30m", "2026-12-03T10:30:00Z"), "2026-12-03T11:00:00+00:00");
        assert_eq!(n("every 7h", "2026-12-03T22:00:00Z"), "2026-12-04T00:00:00+00:00");
        assert_eq!(n("hourly", "2026-12-03T23:59:59Z"), "2026-12-04T00:00:00+00:00");
        assert_eq!(n("daily 02:00", "2026-12-03T01:59:00Z"), "2026-12-03T02:00:00+00:00");
        assert_eq!(n("daily 02:00", "2026-12-03T02:00:00Z"), "2026-12-04T02:00:00+00:00");
        // 2026-12-03 is a Thursday.
        assert_eq!(n("weekly thu 09:00", "2026-12-03T09:00:01Z"), "2026-12-10T09:00:00+00:00");
        assert_eq!(n("weekly sun 03:30", "2026-12-03T12:00:00Z"), "2026-12-06T03:30:00+00:00");
    }

    #[test]
    fn local_time_is_the_zone_given() {
        let cet = FixedOffset::east_opt(3600).expect("offset");
        let t = at("2026-12-03T00:30:00Z").with_timezone(&cet); // 01:30 local
        let next = "daily 02:00".parse::<Schedule>().expect("schedule").next_after(&t);
        assert_eq!(next.to_rfc3339(), "2026-12-03T02:00:00+01:00");
        assert_eq!(next.with_timezone(&Utc).to_rfc3339(), "2026-12-03T01:00:00+00:00");
    }
}
