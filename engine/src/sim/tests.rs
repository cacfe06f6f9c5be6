use super::*;

/// The suite's share of the simulation: 2,000 seeds, none may break an invariant.
#[test]
fn two_thousand_seeds_keep_every_invariant() {
    let origin = crate::testutil::origin();
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut acked = 0;
    for seed in 0..2000 {
        let r = run_seed(seed, 400, origin, false);
        if let Some(v) = &r.violation {
            let again = run_seed(seed, 400, origin, true);
            let tail: Vec<&String> = again.trace.iter().rev().take(40).collect();
            panic!(
                "seed {seed}: invariant {} broken at step {}: {}\nreplay: cargo run --release --bin duet-sim -- --seed {seed} --trace\n{}",
                v.invariant,
                v.step,
                v.what,
                tail.into_iter().rev().cloned().collect::<Vec<_>>().join("\n")
            );
        }
        acked += r.writes_acked;
        for (f, n) in r.faults {
            *faults.entry(f).or_default() += n;
        }
    }
    // The runs did what they are for: writes acknowledged, and every kind of fault drawn.
    // (About 95,000: a switchover closes the export until it completes, as the executor does.)
    assert!(acked > 80_000, "{acked} writes acknowledged");
    for f in [
        Fault::Crash,
        Fault::PowerLoss,
        Fault::BothRestart,
        Fault::Cut,
        Fault::Heal,
        Fault::SlowDisk,
        Fault::DiskError,
        Fault::DiskFail,
        Fault::Handover,
        Fault::Switchover,
        Fault::Disconnect,
        Fault::Invalidate,
        Fault::PartitionPromote,
    ] {
        assert!(faults.get(&f).copied().unwrap_or(0) > 10, "{f:?}: {faults:?}");
    }
}

#[test]
fn a_seed_replays_identically() {
    let origin = crate::testutil::origin();
    let a = run_seed(42, 400, origin, true);
    let b = run_seed(42, 400, origin, true);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.faults, b.faults);
    assert!(!a.trace.is_empty());
}
