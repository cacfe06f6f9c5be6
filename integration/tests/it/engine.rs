//! The replication engine's guarantees against real daemons: a Secondary's power loss costs a
//! resync, never a silent divergence (the transfer log); a resync source that restarted
//! Consistent becomes UpToDate; requests wider than the activity log and coarse bitmap
//! granularities complete.

use std::time::Duration;

use integration::pair::{Pair, PairOpts};
use integration::rawnbd::Raw;
use integration::{have, random_bytes, wait_until};
use replicator::nbd::proto::{CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};

use crate::replication::NbdkitDisk;

const MIB: u64 = 1 << 20;

/// Writes `n` MiB of seeded random data through node 0 from `at_mib`, one MiB a request, no
/// flush.
fn write_mib(p: &Pair, at_mib: u64, n: u64, seed: u64) {
    let mut r = Raw::transmission(p.n[0].nbd_port);
    for i in 0..n {
        let off = (at_mib + i) * MIB;
        r.request(CMD_WRITE, 0, i, off, MIB as u32, &random_bytes(seed + i, MIB as usize)).unwrap();
        assert_eq!(r.reply().unwrap().error, 0, "write at {off}");
    }
}

/// Beta's disk has a volatile write cache (nbdkit's cache filter in writeback mode: a write
/// reaches the file only when flushed). 32 MiB go through alpha without a flush, then beta
/// loses power (daemon, nbdfuse and nbdkit killed at once), alpha writes 16 MiB more, beta
/// returns. `wait_flushed`: wait until alpha's transfer log says beta flushed everything
/// before the power loss (a short bound); otherwise the bound is far away, so the power loss
/// comes before any flush and the transfer log must mark the 32 MiB out of sync.
fn secondary_power_loss_round(peer_extra: &str, wait_flushed: bool) {
    if !have("nbdfuse") || !have("nbdkit") {
        eprintln!("skipped: needs nbdfuse and nbdkit");
        return;
    }
    let mut p = Pair::configure(&PairOpts {
        size: 96 << 20,
        peer: format!(
            "ping_interval_ms = 200\nping_timeout_ms = 1000\nconnect_retry_ms = 200\n{peer_extra}"
        ),
        ..PairOpts::default()
    });
    let cache = ["--filter=cache"];
    let writeback = ["cache=writeback"];
    let mut disk = NbdkitDisk::install(&p, 1, &cache, &writeback);
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    let before = p.num(0, "resync_sent_bytes");
    write_mib(&p, 0, 32, 1000);
    if wait_flushed {
        assert!(
            p.wait_for(0, Duration::from_secs(20), |r| r["peer_unflushed_bytes"] == 0),
            "the peer was never asked to flush: {}",
            p.repl(0)
        );
    } else {
        assert!(p.num(0, "peer_unflushed_bytes") >= 32 * MIB, "{}", p.repl(0));
    }
    // Power loss of beta.
    p.kill(1);
    disk.power_loss();
    assert!(
        p.wait_for(0, Duration::from_secs(20), |r| r["connection"] != "Connected"),
        "{}",
        p.repl(0)
    );
    write_mib(&p, 64, 16, 2000);
    drop(disk);
    let _disk = NbdkitDisk::install(&p, 1, &cache, &writeback);
    p.start(1);
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    let resent = p.num(0, "resync_sent_bytes") - before;
    if wait_flushed {
        // The 32 MiB were durable on beta: only what it missed is resent.
        assert!((16 * MIB..32 * MIB).contains(&resent), "resent {resent}");
    } else {
        assert!(resent >= 48 * MIB, "resent {resent}: the unflushed 32 MiB were not resynced");
    }
    assert!(p.identical(), "replicas differ after the Secondary's power loss and resync");
}

#[test]
fn secondary_power_loss_before_a_flush_is_resynced_not_lost() {
    secondary_power_loss_round("flush_interval_ms = 60000\nflush_after_kib = 4194304", false);
}

#[test]
fn secondary_power_loss_after_the_periodic_flush_resends_only_what_it_missed() {
    secondary_power_loss_round("flush_interval_ms = 300", true);
}

/// Both nodes stop during the initial full sync and start again: the node with the data
/// (Consistent after a clean stop) resyncs the other and is then UpToDate, so it can be
/// promoted without --force.
#[test]
fn a_resync_source_that_restarted_consistent_ends_up_to_date() {
    let mut p = Pair::configure(&PairOpts {
        size: 96 << 20,
        resync: "mode = \"fixed\"\nrate_kib = 16384\nmin_rate_kib = 16384".into(),
        ..PairOpts::default()
    });
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    assert!(p.wait_for(1, Duration::from_secs(20), |r| r["connection"] == "SyncTarget"
        && r["resync"]["done_bytes"].as_u64().unwrap_or(0) > 0));
    p.stop(1);
    p.stop(0);
    p.start(0);
    p.start(1);
    assert_eq!(p.repl(0)["role"], "Secondary");
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    assert_eq!(p.repl(0)["disk"], "UpToDate", "the source stayed {}", p.repl(0));
    assert!(p.ok(0, &["primary"]).contains("Primary"));
    assert!(p.identical());
}

/// A 32 MiB write and a whole-volume trim and write-zeroes with an activity log of 7 extents of
/// 64 KiB (each spans hundreds of extents); then a reconnect, a write, and SIGTERM: everything
/// completes, replicas identical.
#[test]
fn requests_wider_than_the_activity_log_complete() {
    let mut p = Pair::up(&PairOpts {
        size: 96 << 20,
        resource_extra: "activity_log_extent_kib = 64\nactivity_log_extents = 7".into(),
        ..PairOpts::default()
    });
    let size = p.data_size();
    let mut r = Raw::transmission(p.n[0].nbd_port);
    let big = random_bytes(5, 32 << 20);
    r.request(CMD_WRITE, 0, 1, 4096, 32 << 20, &big).unwrap();
    assert_eq!(r.reply().unwrap().error, 0, "32 MiB write");
    r.request(CMD_WRITE_ZEROES, 0, 2, 40 << 20, (size - (40 << 20)) as u32, &[]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0, "write-zeroes");
    r.request(CMD_TRIM, 0, 3, 48 << 20, 16 << 20, &[]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0, "trim");
    drop(r);
    assert!(p.synced(), "{}", p.repl(0));
    // A reconnect, and the write path still moves.
    p.ok(0, &["disconnect"]);
    assert!(p.wait_for(0, Duration::from_secs(10), |r| r["connection"] == "StandAlone"));
    p.ok(0, &["connect"]);
    assert!(p.wait_synced(Duration::from_secs(30)), "{} / {}", p.repl(0), p.repl(1));
    let mut r = Raw::transmission(p.n[0].nbd_port);
    r.request(CMD_WRITE, 0, 4, 0, 8 << 20, &random_bytes(6, 8 << 20)).unwrap();
    assert_eq!(r.reply().unwrap().error, 0, "write after the reconnect");
    drop(r);
    assert!(p.identical());
    p.stop(0); // panics if SIGTERM does not finish
}

/// Coarse bitmap granularities: the initial full sync (and a bitmap resync) finish.
#[test]
fn coarse_bitmap_granularities_resync() {
    for g in [64, 1024] {
        let mut p = Pair::up(&PairOpts {
            size: 64 << 20,
            resource_extra: format!("bitmap_granularity_kib = {g}\nactivity_log_extent_kib = 4096"),
            ..PairOpts::default()
        });
        p.kill(1);
        write_mib(&p, 3, 5, 300);
        p.start(1);
        assert!(
            wait_until(Duration::from_secs(60), || p.synced()),
            "granularity {g} KiB: {} / {}",
            p.repl(0),
            p.repl(1)
        );
        assert!(p.identical(), "granularity {g} KiB");
    }
}
