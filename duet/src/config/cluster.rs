//! `[cluster]` and the per-node overrides.

use super::*;

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Frames from another cluster are dropped.
    pub name: String,
    /// Shared secret; required when two nodes are configured.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The preferred master.
    pub configured_master: String,
    /// off | auto.
    #[serde(default)]
    pub failback: Failback,
    /// CLI ↔ daemon socket. Default `/run/duet/duet.sock`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Prometheus endpoint, "" disables. Default `127.0.0.1:9640`.
    #[serde(default = "default_metrics")]
    pub metrics_listen: Listen,
    /// Threads of the data path (NBD exports, peer links, resync). Default 1: one event loop
    /// that does a replicated write's steps itself, with no hand-over between threads.
    #[serde(default = "default_data_threads")]
    pub data_threads: usize,
    /// Encrypt the replication links (AES-256-GCM). `false` keeps every frame authenticated
    /// but sends the data in the clear (a crossover cable). Default true; both nodes must agree.
    #[serde(default = "default_true")]
    pub link_encryption: bool,
    /// Where the node keeps what must survive a restart (the heartbeat's boot counter and the
    /// peer's replay checkpoint). Default `/var/lib/duet`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Members of this group may run every command on the control socket ("" : root only).
    #[serde(default)]
    pub admin_group: String,
    /// Members of this group may run `status` and `events` ("" : root and admin_group only).
    #[serde(default)]
    pub read_group: String,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/duet")
}

fn default_true() -> bool {
    true
}

/// Most `data_threads` accepted.
pub const MAX_DATA_THREADS: usize = 64;

fn default_data_threads() -> usize {
    1
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/duet/duet.sock")
}
fn default_metrics() -> Listen {
    Listen::At(SocketAddr::from(([127, 0, 0, 1], 9640)))
}

/// `failback`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// The running master stays master.
    #[default]
    Off,
    /// The configured master takes back once in sync.
    Auto,
}

/// `[node.NAME]`: per-node overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeOverrides {
    /// Overrides `cluster.control_socket`.
    pub control_socket: Option<PathBuf>,
    /// Overrides `cluster.metrics_listen`.
    pub metrics_listen: Option<Listen>,
    /// Overrides `fencing.delay_ms` for this node (give the nodes different delays so both
    /// never fence each other at once).
    pub fence_delay_ms: Option<u64>,
}
