//! From a validated configuration to what the runtime needs: the replicator's settings of
//! each resource, the metadata geometry, node ids, the cluster secret.

use std::net::SocketAddr;
use std::path::PathBuf;

use replicator::ratectl;
use replicator::repl::completion::Protocol;
use replicator::repl::handshake;
use replicator::repl::meta::{Geometry, Placement};
use replicator::repl::policy::Policies;
use replicator::repl::volume::VolumeConfig;
use replicator::repl::wire::Digest;

use super::{self as config, Config};

/// Why the runtime cannot be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cluster.secret_file is required for a pair")]
    NoSecretFile,
    #[error(
        "cannot read cluster.secret_file {}: create it with the same content on both nodes (e.g. (umask 077 && head -c 32 /dev/urandom | base64 > {}))",
        path.display(),
        path.display()
    )]
    ReadSecret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cluster.secret_file {} holds {len} bytes: use a secret of at least 8 bytes (e.g. 32 random bytes, base64)",
        path.display()
    )]
    ShortSecret { path: PathBuf, len: usize },
    #[error(
        "cluster.secret_file {} has mode {mode:04o}: group or others can read the key of every link; chmod 600 {}",
        path.display(),
        path.display()
    )]
    SecretMode { path: PathBuf, mode: u32 },
    #[error("resource {resource}: {why}")]
    Policies { resource: String, why: replicator::repl::policy::PolicyError },
    #[error("resource {resource} on {node} has no replication_address; a pair needs one")]
    NoAddress { resource: String, node: String },
}

/// Reads the cluster secret; refuses an empty or unreadable one, and one that group or others
/// may read.
pub fn read_secret(cfg: &Config) -> Result<Vec<u8>, RuntimeError> {
    let path = cfg.cluster.secret_file.as_ref().ok_or(RuntimeError::NoSecretFile)?;
    let read_err = |source| RuntimeError::ReadSecret { path: path.clone(), source };
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(path).map_err(read_err)?.permissions(),
    ) & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RuntimeError::SecretMode { path: path.clone(), mode });
    }
    let s = std::fs::read(path).map_err(read_err)?;
    let s = s.trim_ascii().to_vec();
    if s.len() < 8 {
        return Err(RuntimeError::ShortSecret { path: path.clone(), len: s.len() });
    }
    Ok(s)
}

/// Geometry and placement of a resource's metadata on `node`.
pub fn meta_of(r: &config::Resource, node: &str) -> (Placement, Geometry) {
    let on = &r.on[node];
    let placement = if on.meta == "internal" {
        Placement::Internal
    } else {
        Placement::External(on.meta.clone().into())
    };
    let g = Geometry {
        granularity: r.bitmap_granularity_kib * 1024,
        al_extent_size: r.activity_log_extent_kib * 1024,
        al_extents: r.activity_log_extents,
    };
    (placement, g)
}

/// Node id stored in metadata: the node's index in name order.
pub fn node_id(cfg: &Config, node: &str) -> u32 {
    cfg.node_names().iter().position(|n| *n == node).map_or(0, |i| u32::try_from(i).unwrap_or(0))
}

/// The replicator's settings of resource `r` on `node` (its peer is `peer`).
pub fn volume_config(
    cfg: &Config,
    r: &config::Resource,
    node: &str,
    peer: &str,
    secret: &[u8],
) -> Result<VolumeConfig, RuntimeError> {
    let policies = Policies::parse(
        &r.split_brain.after_sb_0pri,
        &r.split_brain.after_sb_1pri,
        &r.split_brain.after_sb_2pri,
    )
    .map_err(|why| RuntimeError::Policies { resource: r.name.clone(), why })?;
    let addr = |n: &str| -> Result<SocketAddr, RuntimeError> {
        r.on.get(n).and_then(|on| on.replication_address).ok_or_else(|| RuntimeError::NoAddress {
            resource: r.name.clone(),
            node: n.to_string(),
        })
    };
    let protocol = match r.protocol {
        config::Protocol::A => Protocol::A,
        config::Protocol::B => Protocol::B,
        config::Protocol::C => Protocol::C,
    };
    let digest = match r.data_integrity {
        config::DataIntegrity::Off => Digest::Off,
        config::DataIntegrity::Crc32 => Digest::Crc32,
        config::DataIntegrity::Sha256 => Digest::Sha256,
    };
    let s = &r.resync;
    let ms = std::time::Duration::from_millis;
    Ok(VolumeConfig {
        resource: r.name.clone(),
        node: node.into(),
        peer: peer.into(),
        cluster: cfg.cluster.name.clone(),
        protocol,
        digest,
        // Scheduled sync joins the fingerprint only where it is on: a continuous pair keeps the
        // fingerprint of releases without it (a rolling upgrade still connects), and two nodes
        // that disagree on it never replicate.
        fingerprint: {
            let granularity = r.bitmap_granularity_kib.to_string();
            let mut parts = vec![
                r.name.as_str(),
                r.protocol.fingerprint_name(),
                &granularity,
                r.data_integrity.fingerprint_name(),
            ];
            if r.sync == config::SyncMode::Scheduled {
                parts.push("sync=scheduled");
            }
            handshake::fingerprint(&parts)
        },
        policies,
        resync: resync_settings(s),
        checksum_resync: s.checksum,
        replication_rate_limit_kib: s.replication_rate_limit_kib,
        secret: secret.to_vec(),
        protection: if cfg.cluster.link_encryption {
            replicator::repl::seal::Protection::Encrypt
        } else {
            replicator::repl::seal::Protection::Authenticate
        },
        ping_interval: ms(r.peer.ping_interval_ms),
        ping_timeout: ms(r.peer.ping_timeout_ms),
        timeout: ms(r.peer.timeout_ms),
        connect_retry: ms(r.peer.connect_retry_ms),
        transfer_log: replicator::repl::translog::Bound {
            interval: ms(r.peer.flush_interval_ms),
            max_bytes: r.peer.flush_after_kib.saturating_mul(1024),
        },
        listen: addr(node)?,
        peer_addr: addr(peer)?,
        on_io_error: match r.on_io_error {
            config::OnIoError::Detach => replicator::repl::volume::OnIoError::Detach,
            config::OnIoError::Pass => replicator::repl::volume::OnIoError::Pass,
            config::OnIoError::Freeze => replicator::repl::volume::OnIoError::Freeze,
        },
        detached_marker: Some(replicator::repl::volume::marker_path(
            &cfg.cluster.state_dir,
            node,
            &r.name,
        )),
        versions: test_versions(std::env::var("DUET_TEST_PEER_PROTOCOL").ok().as_deref())
            .unwrap_or(handshake::Versions::THIS),
        // Test-only, as the versions: the features a previous release sent (0).
        features: std::env::var("DUET_TEST_PEER_FEATURES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(handshake::FEATURES),
        config_keys: handshake::ConfigKeys(cfg.keys.clone()),
        scheduled: (r.sync == config::SyncMode::Scheduled).then(|| {
            let disk = r.on.get(node).map(|on| on.disk.clone()).unwrap_or_default();
            replicator::repl::volume::Scheduled {
                copy: disk.is_file().then(|| kept_copy_path(&disk)),
                consistent_file: cfg.cluster.state_dir.join(format!("{}.consistent-at", r.name)),
            }
        }),
    })
}

/// Where the last consistent state of a file-backed disk is kept under `sync = "scheduled"`:
/// next to it (a reflink copy must be on the same filesystem), `<disk>.consistent`.
pub fn kept_copy_path(disk: &std::path::Path) -> std::path::PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".consistent");
    s.into()
}

/// Test-only: the replication protocol versions to speak, `"V"` or `"MIN-MAX"` (the
/// rolling-upgrade tests). Not a configuration key: nothing else should ever set it.
fn test_versions(v: Option<&str>) -> Option<handshake::Versions> {
    let v = v?;
    let (min, max) = v.split_once('-').unwrap_or((v, v));
    let (min, max) = (min.trim().parse().ok()?, max.trim().parse().ok()?);
    (min <= max).then_some(handshake::Versions { min, max })
}

/// The resync controller's settings of `[resource.resync]` (at start, and at `duet adjust`).
pub fn resync_settings(s: &config::Resync) -> ratectl::Settings {
    let ms = std::time::Duration::from_millis;
    ratectl::Settings {
        mode: if s.mode == config::ResyncMode::Fixed {
            ratectl::Mode::Fixed
        } else {
            ratectl::Mode::Dynamic
        },
        rate_kib: s.rate_kib,
        plan_ahead: ms(s.plan_ahead_ms),
        fill_target_kib: s.fill_target_kib,
        delay_target: ms(s.delay_target_ms),
        max_rate_kib: s.max_rate_kib,
        min_rate_kib: s.min_rate_kib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_protocol_setting_takes_one_version_or_a_range_and_nothing_else() {
        let v = |min, max| Some(handshake::Versions { min, max });
        assert_eq!(test_versions(Some("1")), v(1, 1));
        assert_eq!(test_versions(Some("2-3")), v(2, 3));
        for bad in ["", "x", "3-2", "1-", "-1", "1-2-3", "-"] {
            assert_eq!(test_versions(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(test_versions(None), None);
    }
}
