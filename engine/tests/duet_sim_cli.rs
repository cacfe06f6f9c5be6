//! `duet-sim` as a user runs it: a few seeds end with the summary line; bad arguments get a
//! usage message and exit status 2.

// A crate of tests (`tests_outside_test_module` is for tests among library code).
#![allow(clippy::tests_outside_test_module)]

use std::process::Command;

fn sim(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_duet-sim")).args(args).output().expect("run duet-sim");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_few_seeds_end_with_the_summary_line() {
    let (code, out, _) = sim(&["--seeds", "20", "--seed", "7"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().last(), Some("20 seeds, 0 violations"), "{out}");
    assert!(out.contains("faults by kind:") && out.contains("seeds/s"), "{out}");
}

#[test]
fn one_seed_replays_with_its_trace() {
    let (code, out, _) = sim(&["--seed", "3", "--trace"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("alpha: primary --force"), "{out}");
    assert_eq!(out.lines().last(), Some("1 seeds, 0 violations"));
}

#[test]
fn the_quorum_simulation_runs_three_and_four_nodes() {
    let (code, out, _) = sim(&["--quorum", "--seeds", "40"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().last(), Some("40 seeds, 0 violations"), "{out}");
    assert!(out.contains("3 nodes") && out.contains("4 nodes"), "{out}");
    let (code, out, _) = sim(&["--quorum", "--seed", "5", "--trace"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(" holds (version "), "{out}");
    assert_eq!(out.lines().last(), Some("1 seeds, 0 violations"));
}

#[test]
fn bad_arguments_are_refused_with_usage() {
    for args in
        [&["--seeds", "many"][..], &["--seeds"][..], &["--steps", "-1"][..], &["--frobnicate"][..]]
    {
        let (code, out, err) = sim(args);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(err.contains("usage: duet-sim"), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} ran anyway: {out}");
    }
}
