//! `duet create-md` and `duet dump-md`: metadata commands that work on the disks directly, with
//! the daemon stopped.

use std::process::ExitCode;

use replicator::repl::meta::Meta;
use replicator::superblock::{
    FLAG_CONSISTENT, FLAG_CRASHED_PRIMARY, FLAG_PEER_OUTDATED, FLAG_WAS_PRIMARY,
};

use crate::config::runtime::{meta_of, node_id};
use crate::config::{Config, Resource};

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
    let sock = cfg.control_socket(node);
    if rt.block_on(tokio::net::UnixStream::connect(&sock)).is_ok() {
        eprintln!(
            "duet: the daemon of {node} is running (control socket {}); stop it before creating metadata",
            sock.display()
        );
        return ExitCode::from(1);
    }
    let rs = match pick(cfg, resource) {
        Ok(r) => r,
        Err(c) => return c,
    };
    for r in rs {
        let (placement, g) = meta_of(r, node);
        let disk = &r.on[node].disk;
        match Meta::create(disk, &placement, g, node_id(cfg, node), force) {
            Ok(l) => crate::outln!(
                "{}: metadata created on {} ({}); {} bytes replicated; disk Inconsistent until `duet primary --force` on the source node or a sync from the peer",
                r.name,
                disk.display(),
                if r.on[node].meta == "internal" { "internal" } else { &r.on[node].meta },
                l.data_size
            ),
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
