//! `--report DIR`: an HTML page with SVG charts of a results file: throughput, latency and CPU
//! per I/O per server and workload (each topology a bar of its own, the whiskers the lowest and
//! highest repetition), the per-repetition ratios against the targets, and the takeover-time
//! distributions of the takeover JSON files found beside the results.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::{Results, Sample, median};

const TOPOLOGY_COLOURS: [RGBColor; 3] =
    [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e), RGBColor(0x2c, 0xa0, 0x2c)];

/// One bar: the median and the range over repetitions.
#[derive(Debug, Clone, Copy)]
struct Stat {
    median: f64,
    lo: f64,
    hi: f64,
}

impl Stat {
    fn of(v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self { median: median(v), lo, hi })
    }
}

/// A grouped bar chart: categories along x, one bar per series in each.
struct Bars<'a> {
    title: String,
    y_label: &'a str,
    categories: Vec<String>,
    series: Vec<(String, Vec<Option<Stat>>)>,
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A white chart with `cats` along x (category i centred on x = i) and 0..top along y.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    cats: &[String],
    top: f64,
) -> anyhow::Result<Chart<'a, 'b>> {
    root.fill(&WHITE)?;
    let n = cats.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() > 1e-6 || i < 0.0 {
            return String::new();
        }
        // i is a whole number in 0..n here.
        cats.iter()
            .zip(0..)
            .find(|&(_, k)| f64::from(k) == i)
            .map(|(c, _)| c.clone())
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .y_desc(y_label)
        .label_style(("sans-serif", 13))
        .draw()?;
    Ok(chart)
}

fn draw_bars(path: &Path, b: &Bars<'_>) -> anyhow::Result<()> {
    let top = b
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().map(|s| s.hi))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.12;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    let mut chart = frame(&root, &b.title, b.y_label, &b.categories, top)?;
    let k = b.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, (name, values)) in b.series.iter().enumerate() {
        let colour = TOPOLOGY_COLOURS[j % TOPOLOGY_COLOURS.len()];
        let left = |i: usize| i as f64 - 0.4 + j as f64 * width;
        chart
            .draw_series(values.iter().enumerate().filter_map(|(i, s)| {
                let s = s.as_ref()?;
                Some(Rectangle::new(
                    [(left(i) + 0.01, 0.0), (left(i) + width - 0.01, s.median)],
                    colour.filled(),
                ))
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        chart.draw_series(values.iter().enumerate().filter_map(|(i, s)| {
            let s = s.as_ref()?;
            Some(ErrorBar::new_vertical(
                left(i) + width / 2.0,
                s.lo,
                s.median,
                s.hi,
                BLACK.stroke_width(1),
                6,
            ))
        }))?;
    }
    if b.series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A strip chart: every sample of each category a dot, its median a bar across.
fn draw_strips(path: &Path, title: &str, rows: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    let top =
        rows.iter().flat_map(|(_, v)| v.iter().copied()).fold(0.0f64, f64::max).max(1.0) * 1.12;
    let cats: Vec<String> = rows.iter().map(|(c, _)| c.clone()).collect();
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    let mut chart = frame(&root, title, "ms", &cats, top)?;
    for (i, (_, v)) in rows.iter().enumerate() {
        let colour = TOPOLOGY_COLOURS[i % TOPOLOGY_COLOURS.len()];
        let len = v.len().max(1) as f64;
        // Spread the dots across the category in sample order (a deterministic jitter).
        chart.draw_series(v.iter().enumerate().map(|(k, &ms)| {
            let x = i as f64 - 0.3 + 0.6 * (k as f64 + 0.5) / len;
            Circle::new((x, ms), 3, colour.mix(0.7).filled())
        }))?;
        let m = median(v.clone());
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(i as f64 - 0.35, m), (i as f64 + 0.35, m)],
            BLACK.stroke_width(2),
        )))?;
    }
    root.present()?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One takeover chart: its title, per configuration the samples in milliseconds, its file.
struct Takeovers {
    title: &'static str,
    rows: Vec<(String, Vec<f64>)>,
    file: &'static str,
}

/// The takeover samples in the JSON files beside the results.
fn takeovers(results: &Path) -> Vec<Takeovers> {
    let read = |name: &str| -> Option<serde_json::Value> {
        let p = results.with_file_name(name);
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    };
    let samples = |row: &serde_json::Value| -> Vec<f64> {
        row["samples_s"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).map(|s| s * 1e3).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    if let Some(v) = read("takeover.json").and_then(|v| v.as_array().cloned()) {
        let rows = v
            .iter()
            .map(|r| {
                (
                    format!(
                        "keepalive {} / deadtime {} ms",
                        r["keepalive_ms"].as_u64().unwrap_or(0),
                        r["deadtime_ms"].as_u64().unwrap_or(0)
                    ),
                    samples(r),
                )
            })
            .collect();
        out.push(Takeovers {
            title: "Takeover: SIGKILL of the master to the first write through the new master",
            rows,
            file: "takeover.svg",
        });
    }
    if let Some(v) = read("lab-takeover.json").and_then(|v| v.as_array().cloned()) {
        let rows =
            v.iter().map(|r| (r["name"].as_str().unwrap_or("?").to_string(), samples(r))).collect();
        out.push(Takeovers {
            title: "Takeover through the VIP after a power loss (namespace lab)",
            rows,
            file: "lab-takeover.svg",
        });
    }
    out
}

/// `--report DIR --from FILE`: the report of an earlier run's results file.
pub(crate) fn from_file(from: &Path, dir: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let res: Results = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a duet-bench results file", from.display()))?;
    write(&res, from, dir)
}

/// Writes `DIR/index.html` and its SVG charts.
pub(crate) fn write(res: &Results, results_file: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut topologies: Vec<String> = Vec::new();
    let mut workloads: Vec<String> = Vec::new();
    let mut servers: Vec<String> = Vec::new();
    for s in &res.samples {
        for (list, v) in [
            (&mut topologies, &s.topology),
            (&mut workloads, &s.workload),
            (&mut servers, &s.server),
        ] {
            if !list.contains(v) {
                list.push(v.clone());
            }
        }
    }
    // Servers in the benchmark's own order.
    servers.sort_by_key(|s| crate::SERVERS.iter().position(|x| x == s).unwrap_or(usize::MAX));
    let pick = |t: &str, w: &str, s: &str, f: &dyn Fn(&Sample) -> f64| {
        Stat::of(
            res.samples
                .iter()
                .filter(|x| x.topology == t && x.workload == w && x.server == s)
                .map(f)
                .collect(),
        )
    };
    let latency = |w: &str| crate::WORKLOADS.iter().any(|x| x.name == w && x.latency);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>duet-bench report</title>\n\
         <style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         th{{background:#f4f4f4}}td:first-child,td:nth-child(2),td:nth-child(3){{text-align:left}}\
         .miss{{color:#b00;font-weight:bold}}.met{{color:#070}}img{{max-width:100%}}</style></head><body>\n\
         <h1>duet-bench report</h1>\n<p>{} repetitions of {} s per server and workload, {} MiB \
         backing files; topologies: {}. Bars are medians, whiskers the lowest and highest \
         repetition. Only ratios within one run mean anything: the machine is shared.</p>\n",
        res.reps,
        res.runtime_s,
        res.size_mib,
        esc(&topologies.join(", "))
    );
    for t in &topologies {
        let rt: Vec<f64> =
            res.round_trips.iter().filter(|r| &r.topology == t).map(|r| r.us).collect();
        if let Some(s) = Stat::of(rt) {
            let _ = writeln!(
                html,
                "<p>{}: TCP round trip from the Primary's side to the Secondary's, p50 {:.1} µs \
                 (repetitions {:.1}–{:.1} µs).</p>",
                esc(t),
                s.median,
                s.lo,
                s.hi
            );
        }
    }
    let _ = writeln!(html, "<h2>Throughput</h2>");
    for w in workloads.iter().filter(|w| !latency(w)) {
        let file = format!("throughput-{w}.svg");
        draw_bars(
            &dir.join(&file),
            &Bars {
                title: format!("{w}: MiB/s"),
                y_label: "MiB/s",
                categories: servers.clone(),
                series: topologies
                    .iter()
                    .map(|t| {
                        (t.clone(), servers.iter().map(|s| pick(t, w, s, &|x| x.mib_s)).collect())
                    })
                    .collect(),
            },
        )?;
        let _ = writeln!(html, "<img src=\"{file}\" alt=\"{w} throughput\">");
    }
    let _ = writeln!(html, "<h2>Latency</h2>");
    for w in &workloads {
        for (label, f) in [
            ("p50", &(|x: &Sample| x.lat_p50_us) as &dyn Fn(&Sample) -> f64),
            ("p99", &|x: &Sample| x.lat_p99_us),
        ] {
            let file = format!("latency-{label}-{w}.svg");
            draw_bars(
                &dir.join(&file),
                &Bars {
                    title: format!("{w}: completion latency {label}, µs"),
                    y_label: "µs",
                    categories: servers.clone(),
                    series: topologies
                        .iter()
                        .map(|t| (t.clone(), servers.iter().map(|s| pick(t, w, s, f)).collect()))
                        .collect(),
                },
            )?;
            let _ = writeln!(html, "<img src=\"{file}\" alt=\"{w} latency {label}\">");
        }
    }
    let _ = writeln!(
        html,
        "<h2>CPU per I/O</h2>\n<p>User and system time of the server's processes (both daemons \
         of a pair, both processes of qsd-mirror) per I/O; for 1 MiB writes, per MiB.</p>"
    );
    for w in &workloads {
        let file = format!("cpu-{w}.svg");
        draw_bars(
            &dir.join(&file),
            &Bars {
                title: format!("{w}: server CPU per I/O, µs"),
                y_label: "CPU µs per I/O",
                categories: servers.clone(),
                series: topologies
                    .iter()
                    .map(|t| {
                        (
                            t.clone(),
                            servers.iter().map(|s| pick(t, w, s, &|x| x.cpu_us_per_io)).collect(),
                        )
                    })
                    .collect(),
            },
        )?;
        let _ = writeln!(html, "<img src=\"{file}\" alt=\"{w} CPU per I/O\">");
    }
    let _ = writeln!(
        html,
        "<h2>Replication against its references</h2>\n<p>Medians of per-repetition ratios \
         (both servers of a ratio ran in the same repetition). Targets in brackets.</p>\n\
         <table><tr><th>topology</th><th>workload</th><th>pair / peer</th><th>throughput</th>\
         <th>CPU per I/O</th><th>p50 extra</th><th>in round trips</th></tr>"
    );
    for r in &res.replication {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let (t, w, p, peer) = (s("topology"), s("workload"), s("server"), s("peer"));
        let target = crate::target(&t, &p, &peer, &w).trim().to_string();
        let ratio = r["ratio"].as_f64().unwrap_or(f64::NAN);
        let met = |ok: bool| if ok { "met" } else { "miss" };
        let thr = if let Some(min) = target
            .strip_prefix("[>= ")
            .and_then(|x| x.strip_suffix(']'))
            .and_then(|x| x.parse::<f64>().ok())
        {
            format!("<span class=\"{}\">{ratio:.2}×</span> {}", met(ratio >= min), esc(&target))
        } else {
            format!("{ratio:.2}×")
        };
        let cpu = r["cpu_per_io_ratio"].as_f64().map_or(String::new(), |c| {
            if p == "duet-C" && peer == "nbdkit" && w == "seqwrite-1m-qd8" {
                format!("<span class=\"{}\">{c:.2}×</span> [&lt;= 2]", met(c <= 2.0))
            } else {
                format!("{c:.2}×")
            }
        });
        let extra = r["p50_extra_us"].as_f64().map_or(String::new(), |d| format!("{d:+.1} µs"));
        let trips = r["p50_extra_round_trips"].as_f64().map_or(String::new(), |d| {
            if p == "duet-C" && peer == "nbdkit" {
                format!("<span class=\"{}\">{d:.2}</span> [&lt;= 1.0]", met(d <= 1.0))
            } else {
                format!("{d:.2}")
            }
        });
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{} / {}</td><td>{thr}</td><td>{cpu}</td><td>{extra}</td><td>{trips}</td></tr>",
            esc(&t),
            esc(&w),
            esc(&p),
            esc(&peer)
        );
    }
    let _ = writeln!(html, "</table>");
    let tk = takeovers(results_file);
    if !tk.is_empty() {
        let _ = writeln!(
            html,
            "<h2>Takeover</h2>\n<p>Every run a dot, the median a bar (from the takeover results \
             beside the results file).</p>"
        );
    }
    for t in &tk {
        draw_strips(&dir.join(t.file), t.title, &t.rows)?;
        let _ = writeln!(html, "<img src=\"{}\" alt=\"{}\">", t.file, esc(t.title));
    }
    let _ = writeln!(html, "</body></html>");
    let index = dir.join("index.html");
    std::fs::write(&index, html).with_context(|| format!("writing {}", index.display()))?;
    println!("report written to {}", index.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RoundTrip;

    fn sample(topology: &str, workload: &str, server: &str, rep: usize, mib_s: f64) -> Sample {
        Sample {
            topology: topology.into(),
            workload: workload.into(),
            server: server.into(),
            rep,
            iops: mib_s * 256.0,
            mib_s,
            lat_p50_us: 1000.0 / mib_s,
            lat_p99_us: 3000.0 / mib_s,
            cpu_us_per_io: 10.0,
        }
    }

    fn results() -> Results {
        let mut samples = Vec::new();
        for rep in 0..3 {
            for t in ["shared", "two-hosts"] {
                for w in ["randwrite-4k-qd32", "write-4k-qd1"] {
                    samples.push(sample(t, w, "duet-C", rep, 100.0 + rep as f64));
                    samples.push(sample(t, w, "nbdkit", rep, 120.0));
                }
            }
        }
        let round_trips = (0..3)
            .flat_map(|rep| {
                ["shared", "two-hosts"].map(|t| RoundTrip { topology: t.into(), rep, us: 50.0 })
            })
            .collect();
        let r = Results {
            reps: 3,
            runtime_s: 5,
            size_mib: 512,
            samples,
            round_trips,
            initial_syncs: Vec::new(),
            medians: Vec::new(),
            replication: Vec::new(),
        };
        let w: Vec<_> = crate::WORKLOADS
            .iter()
            .copied()
            .filter(|w| w.name == "randwrite-4k-qd32" || w.name == "write-4k-qd1")
            .collect();
        crate::summarize(r, &["duet-C", "nbdkit"], &w)
    }

    #[test]
    fn the_report_draws_every_workload_and_judges_the_targets() {
        let dir = std::env::temp_dir().join(format!("duet-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let res = results();
        let file = dir.join("results").join("nbd.json");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, serde_json::to_string(&res).unwrap()).unwrap();
        std::fs::write(
            file.with_file_name("lab-takeover.json"),
            r#"[{"name": "duet aggressive", "samples_s": [0.3, 0.35, 0.4]}]"#,
        )
        .unwrap();
        from_file(&file, &dir.join("out")).unwrap();
        let html = std::fs::read_to_string(dir.join("out/index.html")).unwrap();
        for f in [
            "throughput-randwrite-4k-qd32.svg",
            "latency-p50-write-4k-qd1.svg",
            "latency-p99-write-4k-qd1.svg",
            "latency-p99-randwrite-4k-qd32.svg",
            "cpu-randwrite-4k-qd32.svg",
            "lab-takeover.svg",
        ] {
            assert!(html.contains(f), "{f} not linked");
            let svg = std::fs::read_to_string(dir.join("out").join(f)).unwrap();
            assert!(svg.starts_with("<svg"), "{f}");
            if !f.contains("takeover") {
                // Both servers label the x axis; both topologies are in the legend.
                for label in ["duet-C", "nbdkit", "shared", "two-hosts"] {
                    assert!(svg.contains(label), "{label} not in {f}");
                }
            }
        }
        // 4 KiB random write: duet-C at 100..102 MiB/s against 120 is 0.84x, under both
        // targets (0.9 shared, 1.0 two-hosts); the QD1 extra latency is in round trips of 50 us.
        assert!(html.contains("<span class=\"miss\">0.84×</span> [&gt;= 0.9]"), "{html}");
        assert!(html.contains("<span class=\"miss\">0.84×</span> [&gt;= 1.0]"), "{html}");
        assert!(html.contains("round trip from the Primary"), "{html}");
        assert!(!html.contains("NaN"), "{html}");
        // The takeover strip chart has one dot per run.
        let svg = std::fs::read_to_string(dir.join("out/lab-takeover.svg")).unwrap();
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_is_not_results_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("duet-report-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.json");
        for text in ["", "{", "[1,2]", "{\"reps\": \"three\"}", "\u{0}\u{ff}"] {
            std::fs::write(&f, text).unwrap();
            let e = format!("{:#}", from_file(&f, &dir.join("out")).unwrap_err());
            assert!(e.contains("not a duet-bench results file"), "{text:?}: {e}");
        }
        let e = format!("{:#}", from_file(&dir.join("absent.json"), &dir.join("out")).unwrap_err());
        assert!(e.contains("reading") && e.contains("absent.json"), "{e}");
        assert!(!dir.join("out/index.html").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
