//! The status page served on `/`: the pair at a glance, rendered on the server from one
//! [`NodeStatus`] (no script, no external asset; the page reloads itself every
//! [`REFRESH_S`] seconds). Every value a test or a person looks for carries a `data-field`
//! attribute, so a browser's DOM can be read without parsing the layout.

use std::fmt::Write as _;

use crate::events::Event;
use crate::status::{NodeStatus, bytes, check, timestamp};

/// Seconds between reloads.
pub const REFRESH_S: u32 = 2;
/// Events shown, newest first.
pub const EVENTS_SHOWN: usize = 50;

/// The one-word summary at the top of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Syncing,
    Degraded,
    SplitBrain,
    Standalone,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::Syncing => "Syncing",
            Self::Degraded => "Degraded",
            Self::SplitBrain => "SPLIT BRAIN",
            Self::Standalone => "Standalone",
        }
    }
    fn class(self) -> &'static str {
        match self {
            Self::Healthy => "ok",
            Self::Syncing => "sync",
            Self::Degraded | Self::Standalone => "warn",
            Self::SplitBrain => "crit",
        }
    }
}

/// The verdict: split brain first (it needs an operator), then a node without a replicating
/// peer, then a resync, then anything `duet status --check` does not call OK.
pub fn verdict(s: &NodeStatus) -> Verdict {
    let repl = || s.resources.iter().filter_map(|r| r.replication.as_ref());
    if repl().any(|x| x.split_brain.is_some()) {
        return Verdict::SplitBrain;
    }
    // A failed disk first: StandAlone is its consequence, not the news.
    if s.resources.iter().any(|r| r.disk_state == "Diskless") {
        return Verdict::Degraded;
    }
    // (A scheduled Primary's link idles between catch-ups on purpose.)
    let standalone = |r: &crate::status::ResourceStatus| {
        r.connection == "StandAlone"
            && !(r.role == "Primary"
                && r.replication.as_ref().is_some_and(|x| x.scheduled.is_some()))
    };
    if s.peer.is_none() || s.resources.iter().any(standalone) {
        return Verdict::Standalone;
    }
    if s.resources.iter().any(|r| r.connection == "SyncSource" || r.connection == "SyncTarget") {
        return Verdict::Syncing;
    }
    match check::node(s).0 {
        check::Level::Ok => Verdict::Healthy,
        _ => Verdict::Degraded,
    }
}

/// HTML-escapes text for element content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `<td data-field="name">value</td>`.
fn td(field: &str, value: &str) -> String {
    format!("<td data-field=\"{field}\">{}</td>", esc(value))
}

fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f3f3f3}#verdict{font-size:1.6em;font-weight:bold;padding:.3em .6em;display:inline-block}\
.ok{background:#d8f5d8}.sync{background:#dbe8ff}.warn{background:#ffe9b3}.crit{background:#ffb3b3}\
progress{width:12em}.muted{color:#777}";

/// The page.
// Percentages of byte counts: the float conversion is exact enough.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn render(s: &NodeStatus, events: &[Event]) -> String {
    let v = verdict(s);
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
<title>duet {cluster}: {verdict}</title><style>{STYLE}</style></head><body>\
<h1>duet cluster <span data-field=\"cluster\">{cluster}</span>, seen from \
<span data-field=\"node\">{node}</span></h1>\
<div id=\"verdict\" class=\"{class}\" data-field=\"verdict\">{verdict}</div>",
        cluster = esc(&s.cluster),
        node = esc(&s.node),
        verdict = v.word(),
        class = v.class(),
    );
    let (_, line) = check::node(s);
    let _ = write!(o, "<p data-field=\"check\">{}</p>", esc(&line));
    if s.ha.as_ref().is_some_and(|h| h.maintenance) {
        o.push_str("<p data-field=\"maintenance\" class=\"warn\">MAINTENANCE MODE: the cluster manager changes no role by itself (no takeover, failback or handover); <code>duet maintenance off</code> ends it</p>");
    }

    // Both nodes.
    o.push_str("<h2>Nodes</h2><table id=\"nodes\"><tr><th>node</th><th>running role</th><th>configured role</th><th>health</th><th>state</th></tr>");
    let configured = |n: &str| match &s.ha {
        Some(h) if h.configured_master == n => "master",
        Some(_) => "slave",
        None => "",
    };
    match &s.ha {
        Some(h) => {
            let _ = write!(
                o,
                "<tr data-node=\"{n}\">{}{}{}{}{}</tr>",
                td("name", &s.node),
                td("running", &h.running_role),
                td("configured", configured(&s.node)),
                td("health", if h.healthy { "healthy" } else { "checks fail" }),
                td("state", if s.shutting_down { "stopping" } else { "running (this node)" }),
                n = esc(&s.node),
            );
            if let Some(p) = &s.peer {
                let health = match h.peer_healthy {
                    Some(true) => "healthy",
                    Some(false) => "checks fail",
                    None => "unknown",
                };
                let _ = write!(
                    o,
                    "<tr data-node=\"{n}\">{}{}{}{}{}</tr>",
                    td("name", p),
                    td("running", h.peer_role.as_deref().unwrap_or("unknown")),
                    td("configured", configured(p)),
                    td("health", health),
                    td("state", &format!("peer {}", h.peer)),
                    n = esc(p),
                );
            }
        }
        None => {
            let role =
                if s.resources.iter().all(|r| r.role == "Primary") { "master" } else { "slave" };
            let _ = write!(
                o,
                "<tr data-node=\"{n}\">{}{}{}{}{}</tr>",
                td("name", &s.node),
                td("running", role),
                td("configured", "(no cluster manager)"),
                td("health", ""),
                td("state", "running (this node)"),
                n = esc(&s.node),
            );
            if let Some(p) = &s.peer {
                let _ = write!(
                    o,
                    "<tr data-node=\"{n}\">{}{}{}{}{}</tr>",
                    td("name", p),
                    td("running", "unknown"),
                    td("configured", "(no cluster manager)"),
                    td("health", ""),
                    td("state", "peer (no heartbeat)"),
                    n = esc(p),
                );
            }
        }
    }
    o.push_str("</table>");

    // Resources.
    o.push_str("<h2>Resources</h2><table id=\"resources\"><tr><th>resource</th><th>role</th><th>disk</th><th>connection</th><th>peer disk</th><th>out of sync</th><th>resync</th><th>NBD</th></tr>");
    for r in &s.resources {
        let x = r.replication.as_ref();
        let peer_disk = x.and_then(|x| x.peer_disk).map(|d| format!("{d:?}")).unwrap_or_default();
        let oos = x.map_or(String::new(), |x| bytes(x.out_of_sync_bytes));
        let resync = match x.and_then(|x| x.resync) {
            None => "<td data-field=\"resync\" class=\"muted\">none</td>".to_string(),
            Some(p) => {
                let pct = if p.total_bytes == 0 {
                    100.0
                } else {
                    p.done_bytes as f64 * 100.0 / p.total_bytes as f64
                };
                let eta = p.eta_s.map_or("unknown".into(), duration);
                format!(
                    "<td data-field=\"resync\" data-percent=\"{pct:.0}\"><progress max=\"100\" value=\"{pct:.0}\"></progress> {pct:.1} % of {total}, {rate}/s, ETA <span data-field=\"eta\">{eta}</span></td>",
                    total = bytes(p.total_bytes),
                    rate = bytes(p.rate_bytes_per_s),
                )
            }
        };
        let nbd = match (&r.nbd_listen, r.exporting) {
            (Some(a), true) => format!("serving on {a}, {} client(s)", r.stats.clients_connected),
            _ => "not exporting".into(),
        };
        let sb = x.and_then(|x| x.split_brain.as_deref());
        let _ = write!(
            o,
            "<tr data-resource=\"{n}\">{}{}{}{}{}{}{resync}{}</tr>",
            td("name", &r.name),
            td("role", &r.role),
            td("disk", &r.disk_state),
            td("connection", &r.connection),
            td("peer-disk", &peer_disk),
            td("out-of-sync", &oos),
            td("nbd", &nbd),
            n = esc(&r.name),
        );
        if let Some(why) = sb {
            let _ = write!(
                o,
                "<tr><td colspan=\"8\" class=\"crit\" data-field=\"split-brain\">SPLIT BRAIN: {}</td></tr>",
                esc(why)
            );
        }
        if let Some(sc) = x.and_then(|x| x.scheduled.as_ref()) {
            let when = |t: Option<f64>, none: &str| t.map_or(none.to_string(), timestamp);
            let kept = match (&sc.kept, sc.restorable) {
                (None, _) => String::new(),
                (Some(_), true) => {
                    "; the catch-up was cut off: a promotion restores the kept consistent state"
                        .into()
                }
                (Some(_), false) => "; the consistent state is kept until the catch-up ends".into(),
            };
            let _ = write!(
                o,
                "<tr><td colspan=\"8\" data-field=\"scheduled\">scheduled sync: last consistent point <span data-field=\"last-consistent\">{}</span>, next catch-up {}{}</td></tr>",
                esc(&when(sc.last_consistent, "not yet")),
                esc(&when(sc.next_run, "when the Primary starts one")),
                esc(&kept)
            );
        }
    }
    o.push_str("</table>");

    if let Some(h) = &s.ha {
        o.push_str("<h2>Heartbeat links</h2><table id=\"links\"><tr><th>link</th><th>state</th><th>last heard</th><th>frames in / out / dropped</th></tr>");
        for (i, l) in h.links.iter().enumerate() {
            let heard = l.last_heard_ms.map_or("never".into(), |ms| format!("{ms} ms ago"));
            let _ = write!(
                o,
                "<tr data-link=\"{i}\">{}{}{}{}</tr>",
                td("name", &l.name),
                td("state", &l.state),
                td("last-heard", &heard),
                td("frames", &format!("{} / {} / {}", l.frames_in, l.frames_out, l.dropped)),
            );
        }
        o.push_str("</table>");

        o.push_str("<h2>VIPs</h2>");
        if h.vips.is_empty() {
            o.push_str("<p class=\"muted\">none configured</p>");
        } else {
            o.push_str(
                "<table id=\"vips\"><tr><th>address</th><th>interface</th><th>held by</th></tr>",
            );
            for x in &h.vips {
                let _ = write!(
                    o,
                    "<tr>{}{}{}</tr>",
                    td("address", &x.addresses.join(", ")),
                    td("interface", &x.interface),
                    td("holder", x.holder.as_deref().unwrap_or("nobody")),
                );
            }
            o.push_str("</table>");
        }

        o.push_str("<h2>Services</h2>");
        if h.services.is_empty() {
            o.push_str("<p class=\"muted\">none configured</p>");
        } else {
            o.push_str("<table id=\"services\"><tr><th>service</th><th>runs on</th><th>state here</th></tr>");
            for x in &h.services {
                let _ = write!(
                    o,
                    "<tr data-service=\"{n}\">{}{}{}</tr>",
                    td("name", &x.name),
                    td("placement", &x.placement),
                    td("state", &x.state),
                    n = esc(&x.name),
                );
            }
            o.push_str("</table>");
        }

        if !h.checks.is_empty() {
            o.push_str("<h2>Health checks</h2><table id=\"checks\"><tr><th>check</th><th>what</th><th>group</th><th>verdict</th></tr>");
            for x in &h.checks {
                let _ = write!(
                    o,
                    "<tr data-check=\"{n}\">{}{}{}{}</tr>",
                    td("name", &x.name),
                    td("what", &x.what),
                    td("group", x.group.as_deref().unwrap_or("")),
                    td("verdict", if x.ok { "ok" } else { "FAILING" }),
                    n = esc(&x.name),
                );
            }
            o.push_str("</table>");
        }

        let _ = write!(
            o,
            "<h2>Switchover</h2><p data-field=\"switchover\" data-possible=\"{}\">{}: {}</p>",
            h.switchover.possible,
            if h.switchover.possible { "possible now" } else { "not possible now" },
            esc(&h.switchover.why),
        );
        if let Some(a) = &h.activity {
            let _ = write!(o, "<p data-field=\"activity\">running: {}</p>", esc(a));
        }
    }

    // Numbered by each event's sequence number, newest first.
    let newest = events.last().map_or(0, |e| e.seq);
    let _ = write!(o, "<h2>Last events</h2><ol id=\"events\" reversed start=\"{newest}\">");
    for e in events.iter().rev().take(EVENTS_SHOWN) {
        let _ = write!(
            o,
            "<li><span class=\"muted\">{}</span> {}</li>",
            esc(&timestamp(e.at)),
            esc(&e.line())
        );
    }
    let _ = write!(
        o,
        "</ol><p class=\"muted\">duet {} (pid {}, up {}); this page reloads every {REFRESH_S} s; \
<a href=\"/status\">/status</a> <a href=\"/metrics\">/metrics</a></p></body></html>",
        esc(&s.version),
        s.pid,
        duration(s.uptime_s),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::fixture;

    fn repl(s: &mut NodeStatus) -> &mut replicator::repl::volume::ReplStatus {
        s.resources[0].replication.as_mut().expect("replicated")
    }

    #[test]
    fn the_verdict_follows_the_worst_state() {
        use replicator::repl::volume::{ConnState, DiskState, Progress};
        let mut s = fixture();
        assert_eq!(verdict(&s), Verdict::Healthy);
        s.resources[0].connection = "SyncSource".into();
        repl(&mut s).connection = ConnState::SyncSource;
        repl(&mut s).peer_disk = Some(DiskState::Inconsistent);
        repl(&mut s).resync = Some(Progress {
            total_bytes: 100 << 20,
            done_bytes: 25 << 20,
            elapsed_s: 5.0,
            rate_bytes_per_s: 5 << 20,
            average_rate_bytes_per_s: 5 << 20,
            eta_s: Some(15),
        });
        assert_eq!(verdict(&s), Verdict::Syncing);
        let page = render(&s, &[]);
        assert!(page.contains("data-percent=\"25\""), "{page}");
        assert!(page.contains("ETA <span data-field=\"eta\">15 s</span>"), "{page}");
        let mut d = fixture();
        d.ha.as_mut().expect("ha").peer = "dead".into();
        assert_eq!(verdict(&d), Verdict::Degraded);
        let mut sb = fixture();
        repl(&mut sb).split_brain = Some("both nodes wrote".into());
        assert_eq!(verdict(&sb), Verdict::SplitBrain);
        assert!(render(&sb, &[]).contains("SPLIT BRAIN: both nodes wrote"));
        let mut alone = fixture();
        alone.resources[0].connection = "StandAlone".into();
        assert_eq!(verdict(&alone), Verdict::Standalone);
        // A scheduled master between catch-ups is healthy, and the page says when the standby
        // was last in sync.
        repl(&mut alone).connection = ConnState::StandAlone;
        repl(&mut alone).peer_disk = None;
        repl(&mut alone).scheduled = Some(replicator::repl::volume::ScheduledStatus {
            last_consistent: Some(1_796_000_000.0),
            next_run: Some(1_796_003_600.0),
            kept: None,
            restorable: false,
        });
        assert_eq!(verdict(&alone), Verdict::Healthy, "{:?}", check::node(&alone));
        let page = render(&alone, &[]);
        assert!(
            page.contains(
                "scheduled sync: last consistent point <span data-field=\"last-consistent\">2026-"
            ),
            "{page}"
        );
        let mut single = fixture();
        single.peer = None;
        single.ha = None;
        single.resources[0].replication = None;
        assert_eq!(verdict(&single), Verdict::Standalone);
        assert!(render(&single, &[]).contains("(no cluster manager)"));
    }

    #[test]
    fn the_page_shows_both_nodes_links_vips_services_switchover_and_the_last_events() {
        let s = fixture();
        let j = crate::events::Journal::in_memory();
        for i in 0..60 {
            j.push(format!("event {i}"));
        }
        let events = j.since_seq(0);
        let p = render(&s, &events);
        for want in [
            "data-field=\"verdict\">Healthy<",
            "<tr data-node=\"alpha\"><td data-field=\"name\">alpha</td><td data-field=\"running\">master</td><td data-field=\"configured\">master</td><td data-field=\"health\">healthy</td>",
            "<tr data-node=\"beta\"><td data-field=\"name\">beta</td><td data-field=\"running\">slave</td><td data-field=\"configured\">slave</td>",
            "<td data-field=\"peer-disk\">UpToDate</td>",
            "<td data-field=\"name\">udp a -&gt; b</td><td data-field=\"state\">up</td><td data-field=\"last-heard\">40 ms ago</td>",
            "<td data-field=\"address\">192.0.2.10/24</td><td data-field=\"interface\">eth0</td><td data-field=\"holder\">alpha</td>",
            "<td data-field=\"state\">running</td>",
            "data-possible=\"true\">possible now: make-slave here hands over",
            "event 59",
            "http-equiv=\"refresh\"",
            "<tr data-check=\"uplink\"><td data-field=\"name\">uplink</td><td data-field=\"what\">ping 192.0.2.1</td><td data-field=\"group\">internet (require all)</td><td data-field=\"verdict\">FAILING</td></tr>",
        ] {
            assert!(p.contains(want), "{want} missing in {p}");
        }
        assert!(!p.contains("event 9<"), "only the last {EVENTS_SHOWN} events");
        assert!(!p.contains("MAINTENANCE MODE"));
        let mut m = s.clone();
        m.ha.as_mut().unwrap().maintenance = true;
        assert!(
            render(&m, &events)
                .contains("data-field=\"maintenance\" class=\"warn\">MAINTENANCE MODE")
        );
        assert!(p.find("event 59").unwrap() < p.find("event 58").unwrap(), "newest first");
        assert!(!p.contains("src=") && !p.contains("http://") && !p.contains("<script"));
    }

    #[test]
    fn hostile_text_is_escaped() {
        let mut s = fixture();
        s.cluster = "<script>alert(1)</script>".into();
        s.resources[0].name = "\"><img src=x onerror=alert(1)>".into();
        let j = crate::events::Journal::in_memory();
        j.push("<b>bold</b> & 'quoted'".into());
        let p = render(&s, &j.since_seq(0));
        assert!(!p.contains("<script>") && !p.contains("<img") && !p.contains("<b>"), "{p}");
        assert!(p.contains("&lt;b&gt;bold&lt;/b&gt; &amp; &#39;quoted&#39;"), "{p}");
    }
}
