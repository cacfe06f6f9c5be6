//! `duet create-md` and `duet dump-md`: metadata commands that work on the disks directly, with
//! the daemon stopped.

use std::process::ExitCode;

use replicator::repl::meta::Meta;
use replicator::superblock::{
    FLAG_CONSISTENT, FLAG_CRASHED_PRIMARY, FLAG_PEER_OUTDATED, FLAG_WAS_PRIMARY,
};

use crate::config::runtime::{meta_of, node_id};
use crate::config::{Config, Resource};
use replicator::repl::volume::{marker_path, read_marker};

fn pick<'a>(cfg: &'a Config, resource: Option<&str>) -> Result<Vec<&'a Resource>, ExitCode> {
    match resource {
        None => Ok(cfg.resource.iter().collect()),
        Some(n) => match cfg.resource.iter().find(|r| r.name == n) {
            Some(r) => Ok(vec![r]),
            None => {
                eprintln!("duet: no resource named {n:?} in the configuration");
                Err(ExitCode::from(2))
            }
        },
    }
}

/// `Err` (printed) when the daemon of `node` runs: `what` may not be done under it.
fn daemon_stopped(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    node: &str,
    what: &str,
) -> Result<(), ExitCode> {
    let sock = cfg.control_socket(node);
    if rt.block_on(tokio::net::UnixStream::connect(&sock)).is_ok() {
        eprintln!(
            "duet: the daemon of {node} is running (control socket {}); stop it before {what}",
            sock.display()
        );
        return Err(ExitCode::from(1));
    }
    Ok(())
}

/// Removes a resource's detached marker (a new disk, or one taken back), durably.
fn clear_marker(cfg: &Config, node: &str, resource: &str) -> std::io::Result<bool> {
    let m = marker_path(&cfg.cluster.state_dir, node, resource);
    match std::fs::remove_file(&m) {
        Ok(()) => {
            if let Some(dir) = m.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `duet attach RESOURCE`: a disk detached after an I/O error is taken back, Inconsistent with
/// every block out of sync (nothing it holds is trusted: the next connect resyncs all of it).
pub fn attach(rt: &tokio::runtime::Runtime, cfg: &Config, node: &str, resource: &str) -> ExitCode {
    if let Err(c) = daemon_stopped(rt, cfg, node, "attaching a disk") {
        return c;
    }
    let r = match pick(cfg, Some(resource)) {
        Ok(r) => r[0],
        Err(c) => return c,
    };
    if cfg.peer_of(node).is_none() {
        eprintln!("duet: this configuration has a single node: no disk is ever detached");
        return ExitCode::from(2);
    }
    let marker = marker_path(&cfg.cluster.state_dir, node, resource);
    let Some(f) = read_marker(&marker) else {
        crate::outln!(
            "{resource}: the disk is not detached (no {}); nothing to do",
            marker.display()
        );
        return ExitCode::SUCCESS;
    };
    let (placement, g) = meta_of(r, node);
    let disk = &r.on[node].disk;
    let (meta, loaded) = match Meta::open(disk, &placement, g, node_id(cfg, node)) {
        Ok(x) => x,
        Err(e) => {
            eprintln!(
                "duet: {resource}: the metadata on {} cannot be read ({e}); if the disk was replaced, run `duet create-md --force --resource {resource}`",
                disk.display()
            );
            return ExitCode::from(1);
        }
    };
    let mut bitmap = loaded.bitmap;
    bitmap.set_all();
    let pages: Vec<_> = bitmap.take_dirty().into_iter().map(|i| (i, bitmap.page(i))).collect();
    let mut sb = loaded.sb;
    sb.sequence += 1;
    sb.flags &= !(FLAG_CONSISTENT | FLAG_CRASHED_PRIMARY | FLAG_PEER_OUTDATED | FLAG_WAS_PRIMARY);
    if let Err(e) = meta.write_bitmap(&pages).and_then(|()| meta.write_sb(&sb)) {
        eprintln!(
            "duet: {resource}: writing the metadata on {} failed ({e}): the disk stays detached",
            disk.display()
        );
        return ExitCode::from(1);
    }
    if let Err(e) = clear_marker(cfg, node, resource) {
        eprintln!("duet: {resource}: cannot remove {} ({e})", marker.display());
        return ExitCode::from(1);
    }
    crate::outln!(
        "{resource}: {} attached again (detached after {} at {} failed: {}); Inconsistent: the next connect resyncs all of it from the peer",
        disk.display(),
        f.op,
        f.offset,
        f.error
    );
    ExitCode::SUCCESS
}

/// Initialises metadata; refuses while the daemon runs.
pub fn create(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    node: &str,
    resource: Option<&str>,
    force: bool,
) -> ExitCode {
    if cfg.peer_of(node).is_none() {
        eprintln!(
            "duet: this configuration has a single node: it keeps no replication metadata (nothing to create)"
        );
        return ExitCode::from(2);
    }
    if let Err(c) = daemon_stopped(rt, cfg, node, "creating metadata") {
        return c;
    }
    let rs = match pick(cfg, resource) {
        Ok(r) => r,
        Err(c) => return c,
    };
    for r in rs {
        let (placement, g) = meta_of(r, node);
        let disk = &r.on[node].disk;
        match Meta::create(disk, &placement, g, node_id(cfg, node), force) {
            Ok(l) => {
                // A new disk (or new metadata) in place of a detached one: attached again.
                match clear_marker(cfg, node, &r.name) {
                    Ok(true) => crate::outln!("{}: the detached marker is removed", r.name),
                    Ok(false) => {}
                    Err(e) => {
                        eprintln!("duet: {}: cannot remove the detached marker ({e})", r.name);
                        return ExitCode::from(1);
                    }
                }
                crate::outln!(
                    "{}: metadata created on {} ({}); {} bytes replicated; disk Inconsistent until `duet primary --force` on the source node or a sync from the peer",
                    r.name,
                    disk.display(),
                    if r.on[node].meta == "internal" { "internal" } else { &r.on[node].meta },
                    l.data_size
                );
            }
            Err(e) => {
                eprintln!("duet: {}: {e}", r.name);
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// Prints metadata.
pub fn dump(cfg: &Config, node: &str, resource: Option<&str>) -> ExitCode {
    let rs = match pick(cfg, resource) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let mut failed = false;
    for r in rs {
        let (placement, g) = meta_of(r, node);
        let disk = &r.on[node].disk;
        match Meta::peek(disk, &placement, g) {
            Ok((l, sb)) => {
                let flags: Vec<&str> = [
                    (FLAG_CONSISTENT, "consistent"),
                    (FLAG_WAS_PRIMARY, "was-primary"),
                    (FLAG_CRASHED_PRIMARY, "crashed-primary"),
                    (FLAG_PEER_OUTDATED, "peer-outdated"),
                ]
                .iter()
                .filter(|(f, _)| sb.flags & f != 0)
                .map(|(_, n)| *n)
                .collect();
                crate::outln!("resource {} on {node} ({})", r.name, disk.display());
                crate::outln!("  sequence {}", sb.sequence);
                crate::outln!("  node id {}", sb.node_id);
                crate::outln!("  volume size {} bytes", sb.volume_size);
                crate::outln!("  flags [{}]", flags.join(", "));
                crate::outln!("  current generation {:016x}", sb.uuids.current);
                crate::outln!("  bitmap generation {:016x}", sb.uuids.bitmap);
                crate::outln!(
                    "  history {:016x} {:016x}",
                    sb.uuids.history[0],
                    sb.uuids.history[1]
                );
                crate::outln!(
                    "  bitmap granularity {} bytes, {} bytes on disk at {}",
                    sb.bitmap_granularity,
                    l.bitmap_bytes,
                    l.bitmap
                );
                crate::outln!(
                    "  activity log {} extents of {} bytes, slots at {} and {}",
                    sb.al_extents,
                    sb.al_extent_size,
                    l.al[0],
                    l.al[1]
                );
            }
            Err(e) => {
                eprintln!("duet: {}: {e}", r.name);
                failed = true;
            }
        }
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
