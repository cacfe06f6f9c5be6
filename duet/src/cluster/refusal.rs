//! Why the cluster manager refused or gave up a switchover, a takeover or a release. Each
//! message says what is wrong and, where there is one, what to do; the operator reads it as
//! the answer to `duet make-master` / `make-slave`, the peer as the reason of its control reply.

use super::Step;

/// Why the local data is not fit for the master role (see [`Refusal::Stale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    Resyncing,
    NotUpToDate(&'static str),
    NotInSync,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Resyncing => {
                f.write_str("a resync is running; wait until `duet status` shows both nodes UpToDate")
            }
            Self::NotUpToDate(disk) => write!(f, "the local data is {disk}, not UpToDate"),
            Self::NotInSync => f.write_str(
                "this node is not in sync with the peer (replication link down, or blocks out of sync)",
            ),
        }
    }
}

/// A refused or failed request of the cluster manager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this node is stopping")]
    Stopping,
    #[error(
        "refused: maintenance mode is on, so the cluster manager takes no action; change roles by hand (`duet primary` / `duet secondary`), or run `duet maintenance off` first"
    )]
    Maintenance,
    #[error("a switchover is already running; see `duet status`")]
    SwitchoverRunning,
    /// The local data is not fit; `peer_master`: the peer is master, and not even `--force`
    /// overrides that (otherwise `--force` would have promoted).
    #[error("refused: {why}{}", stale_hint(*peer_master))]
    Stale { why: Stale, peer_master: bool },
    #[error(
        "refused: the peer has not been heard yet (waiting up to initdead_ms); try again in a moment, or if you know the peer is down, run `duet make-master --force`"
    )]
    PeerNotHeard,
    #[error(
        "refused: the peer is unreachable on every heartbeat link, so the switchover cannot be coordinated; if you know the peer is down, run `duet make-master --force`"
    )]
    PeerUnreachable,
    #[error("refused: the peer is unreachable; there is no node to hand the master role to")]
    NoNodeToHandTo,
    #[error(
        "refused: the peer is not in sync with this master (resync running or link down); wait until `duet status` shows it UpToDate"
    )]
    PeerNotInSync,
    #[error("the peer refused to release: {0}")]
    PeerRefusedRelease(String),
    #[error("the peer did not take over: {0}")]
    PeerDidNotTakeOver(String),
    #[error("the peer did not answer the release request in time")]
    ReleaseUnanswered,
    #[error("the peer did not take over in time")]
    TakeOverUnanswered,
    #[error(
        "the peer released but this node did not get in sync in time (disk {disk}, in sync: {in_sync})"
    )]
    NoSyncInTime { disk: &'static str, in_sync: bool },
    /// A step that must not fail failed, and ended the transition.
    #[error("{step:?} failed: {why}")]
    StepFailed { step: Step, why: String },
    /// Asked by the peer to release while a transition runs here.
    #[error("a takeover or release is already running here")]
    BusyHere,
    /// Asked by the peer to release while it is not in sync with us.
    #[error(
        "the requester is not in sync with this master (resync running or link down); wait for `duet status` to show it UpToDate"
    )]
    RequesterNotInSync,
    /// Asked by the peer to take over while our own health checks fail.
    #[error("the slave's health checks fail too")]
    UnhealthyToo,
}

fn stale_hint(peer_master: bool) -> &'static str {
    if peer_master {
        " (--force cannot help while the peer is master: it would throw away the master's newer writes)"
    } else {
        "; --force promotes anyway"
    }
}

/// What answers a request: a message saying what was done, or why not.
pub type Answer = Result<String, Refusal>;
