//! `duet-sim --seeds N [--seed S] [--steps K] [--trace] [--quorum]`: runs the deterministic
//! simulation of a pair (see `engine::sim`) for N seeds from S, prints the faults by kind and the
//! seeds per second, and ends with `N seeds, V violations` (exit status 1 when V > 0). A failing
//! seed is printed with the command that replays it and the end of its trace. `--quorum` runs
//! the simulation of quorum on three and four nodes instead (`engine::quorum::sim`).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use engine::quorum::sim as quorum;
use engine::sim::{Fault, run_seed};

fn usage() -> ExitCode {
    eprintln!("usage: duet-sim [--seeds N] [--seed FIRST] [--steps K] [--trace] [--quorum]");
    ExitCode::from(2)
}

#[allow(clippy::disallowed_methods)] // the driver reads the clock: for the origin and the rate
fn main() -> ExitCode {
    let mut seeds: u64 = 1000;
    let mut first: u64 = 0;
    let mut steps: usize = 400;
    let mut trace = false;
    let mut one = false;
    let mut quorum = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("duet-sim: {what} needs a number");
            }
            v
        };
        match a.as_str() {
            "--seeds" => match num("--seeds") {
                Some(v) => seeds = v,
                None => return usage(),
            },
            "--seed" => match num("--seed") {
                Some(v) => {
                    first = v;
                    one = true;
                }
                None => return usage(),
            },
            "--steps" => match num("--steps").and_then(|v| usize::try_from(v).ok()) {
                Some(v) => steps = v,
                None => return usage(),
            },
            "--trace" => trace = true,
            "--quorum" => quorum = true,
            "-h" | "--help" => {
                let _ = usage();
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("duet-sim: unknown argument {other}");
                return usage();
            }
        }
    }
    if one && !args_had_seeds() {
        seeds = 1;
    }
    let origin = Instant::now();
    if quorum {
        return run_quorum(first, seeds, origin, trace);
    }
    let start = Instant::now();
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let (mut violations, mut acked, mut flushed) = (0u64, 0u64, 0u64);
    for seed in first..first.saturating_add(seeds) {
        let r = run_seed(seed, steps, origin, trace);
        if trace {
            for l in &r.trace {
                println!("{l}");
            }
        }
        acked += r.writes_acked;
        flushed += r.flushes_acked;
        for (f, n) in r.faults {
            *faults.entry(f).or_default() += n;
        }
        if let Some(v) = r.violation {
            violations += 1;
            println!(
                "seed {seed}: invariant {} broken at step {}: {}",
                v.invariant, v.step, v.what
            );
            println!("  replay: duet-sim --seed {seed} --trace");
            if !trace {
                print_tail(&run_seed(seed, steps, origin, true).trace);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("faults by kind:");
    for (f, n) in &faults {
        println!("  {f:?}: {n}");
    }
    println!("acknowledged writes {acked}, acknowledged flushes {flushed}");
    finish(seeds, secs, violations)
}

/// `--seeds` given explicitly (then `--seed` is the first of N, not the only one).
fn args_had_seeds() -> bool {
    std::env::args().any(|a| a == "--seeds")
}

/// `--quorum`: the seeds of `engine::quorum::sim`.
#[allow(clippy::disallowed_methods)] // the driver reads the clock for the rate
fn run_quorum(first: u64, seeds: u64, origin: Instant, trace: bool) -> ExitCode {
    let start = Instant::now();
    let (mut violations, mut tenures, mut writes, mut faults, mut delivered) = (0u64, 0, 0, 0, 0);
    let mut shapes: BTreeMap<(u8, u32), u64> = BTreeMap::new();
    for seed in first..first.saturating_add(seeds) {
        let r = quorum::run_seed(seed, origin, trace);
        if trace {
            for l in &r.trace {
                println!("{l}");
            }
        }
        tenures += r.tenures;
        writes += r.writes;
        faults += r.faults;
        delivered += r.delivered;
        *shapes.entry((r.nodes, r.data.count_ones())).or_default() += 1;
        if let Some((inv, what)) = r.violations.first() {
            violations += 1;
            println!(
                "seed {seed} ({} nodes, data {:#06b}, lease {} ms): invariant {inv} broken: {what}",
                r.nodes, r.data, r.lease_ms
            );
            println!("  replay: duet-sim --quorum --seed {seed} --trace");
            if !trace {
                print_tail(&quorum::run_seed(seed, origin, true).trace);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for ((n, d), k) in &shapes {
        println!("  {n} nodes, {d} with a disk: {k} seeds");
    }
    println!("tenures {tenures}, answered writes {writes}, faults {faults}, messages {delivered}");
    finish(seeds, secs, violations)
}

/// The last 25 lines of a failing seed's trace.
fn print_tail(trace: &[String]) {
    for l in &trace[trace.len().saturating_sub(25)..] {
        println!("  {l}");
    }
}

/// The closing lines (the rate, then the count the scripts look for) and the exit status.
fn finish(seeds: u64, secs: f64, violations: u64) -> ExitCode {
    #[allow(clippy::cast_precision_loss)]
    let rate = seeds as f64 / secs.max(1e-9);
    println!("{seeds} seeds in {secs:.1} s ({rate:.0} seeds/s)");
    println!("{seeds} seeds, {violations} violations");
    if violations > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
