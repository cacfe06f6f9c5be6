//! The daemon's errors: why it could not start or stop cleanly (configuration or environment,
//! each naming the key or the resource), and why a control command was refused.

use std::net::SocketAddr;
use std::path::PathBuf;

use replicator::repl::meta::MetaError;
use replicator::store::StoreError;

use crate::cluster::Refusal;
use crate::config::runtime::RuntimeError;
use crate::ha::{ExportError, StartError};

/// Why the daemon could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] RuntimeError),
    #[error(
        "in a pair every resource needs its own nbd_listen ({0} is used twice): an export opens and closes with its resource's role"
    )]
    SharedListen(std::net::SocketAddr),
    #[error("resource[{index}] ({name}): resource[{index}].nbd")]
    Tls {
        index: usize,
        name: String,
        #[source]
        source: Box<replicator::nbd::tls::TlsError>,
    },
    #[error("resource[{index}] ({name}): resource[{index}].on.{node}.disk")]
    Store {
        index: usize,
        name: String,
        node: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "resource {name} on {node}: cannot attach the metadata (a new disk needs `duet create-md`)"
    )]
    Meta {
        name: String,
        node: String,
        #[source]
        source: MetaError,
    },
    #[error(
        "cannot listen for the peer on {addr} (resource[{index}].on.{node}.replication_address)"
    )]
    PeerListen {
        addr: SocketAddr,
        index: usize,
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "resource[{index}] ({name}): sync = \"scheduled\" keeps the standby's last consistent state before each catch-up, and {why}"
    )]
    NoKeptState { index: usize, name: String, why: String },
    #[error("resource {name}")]
    Volume {
        name: String,
        #[source]
        source: MetaError,
    },
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Ha(#[from] StartError),
    #[error("cannot create {} for the control socket", .dir.display())]
    ControlDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another duet daemon is running on control socket {}; stop it first, or give this node its own control_socket",
        .0.display()
    )]
    ControlInUse(PathBuf),
    #[error("{key} = {name:?}: no such group; create it (groupadd {name}) or set \"\"")]
    NoGroup { key: &'static str, name: String },
    #[error("{what} control socket {}", .path.display())]
    ControlSocket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for metrics on {addr} (metrics_listen); set it to \"\" to disable")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the event log (cluster.state_dir)")]
    Events(#[source] crate::state::StateError),
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("the final flush of a backing store failed; see the log above")]
    FinalFlush,
}

/// Why a control command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(
        "the cluster manager is not running (no [[heartbeat.link]] configured): use `duet primary` / `duet secondary`"
    )]
    NoClusterManager,
    #[error("the cluster manager stopped")]
    ManagerStopped,
    #[error("the cluster manager dropped the request")]
    Dropped,
    #[error("the switchover did not finish in time; see `duet events`")]
    SwitchoverTimeout,
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("no resource named {0:?} in the configuration")]
    NoSuchResource(String),
    #[error("resource {0} has no peer: it is always Primary and replicates nowhere")]
    NoPeer(String),
    /// The replicator refused (its message says why and what to do).
    #[error("{resource}: {why}")]
    Resource { resource: String, why: String },
    #[error("{resource}: {}; demoted again", crate::error_chain(.err))]
    ExportAfterPromote { resource: String, err: ExportError },
    /// `duet adjust` / SIGHUP refused: the file is unreadable or invalid, or a change needs a
    /// restart; nothing was applied.
    #[error("not reloaded: {0}")]
    Reload(String),
    /// A role or link command in an HA pair outside maintenance mode: the cluster manager
    /// owns roles there.
    #[error(
        "refused: in an HA pair the cluster manager owns the roles; `duet {cmd}` here would act behind its back (no VIP, no services, undone at the next decision); use {instead}, or turn maintenance mode on first (`duet maintenance on`) to act by hand"
    )]
    ManagedByCluster { cmd: &'static str, instead: &'static str },
    /// `duet maintenance` refused or failed.
    #[error("{0}")]
    Maintenance(String),
}
