//! The local and peer views the cluster manager decides on, from the replicator's summaries and
//! from heartbeat frames, and the state this node sends in its own frames. The codes are the
//! engine's (`Role::code`, `DiskState::code`, `ConnState::code`), one mapping for the
//! replication link, the heartbeat and status.

use super::*;
use replicator::repl::volume::Summary;

/// This node's view: every resource's summary, in resource order.
pub(super) fn local_view(summaries: &[Summary]) -> LocalView {
    let any = !summaries.is_empty();
    let mut v = LocalView {
        primary: any,
        any_primary: false,
        uptodate: any,
        in_sync: any,
        resyncing: false,
        peer_primary: false,
        disconnected: 0,
        synced: 0,
        diskless: 0,
        scheduled: 0,
        restorable: false,
        worst_disk: DiskState::UpToDate.name(),
    };
    let mut restorable = any;
    let mut worst = DiskState::UpToDate;
    for (i, s) in summaries.iter().enumerate() {
        let primary = s.role == Role::Primary;
        v.primary &= primary;
        v.any_primary |= primary;
        v.uptodate &= s.disk == DiskState::UpToDate;
        worst = worst.min(s.disk);
        // A Diskless peer stays connected only as a Primary serving through us: then our
        // disk is the whole copy.
        let synced = s.connection == ConnState::Connected
            && matches!(s.peer_disk, Some(DiskState::UpToDate | DiskState::Diskless))
            && s.out_of_sync_bytes == 0;
        v.in_sync &= synced;
        if synced && i < 32 {
            v.synced |= 1 << i;
        }
        v.resyncing |= matches!(s.connection, ConnState::SyncSource | ConnState::SyncTarget);
        v.peer_primary |= s.peer_role == Some(Role::Primary);
        let down = matches!(
            s.connection,
            ConnState::StandAlone | ConnState::Connecting | ConnState::Disconnecting
        );
        if down && i < 32 {
            v.disconnected |= 1 << i;
        }
        if s.disk == DiskState::Diskless && i < 32 {
            v.diskless |= 1 << i;
        }
        if s.scheduled && i < 32 {
            v.scheduled |= 1 << i;
        }
        restorable &= s.disk == DiskState::UpToDate || s.restorable;
    }
    v.restorable = restorable && !v.uptodate;
    v.worst_disk = worst.name();
    v
}

/// The peer's view, from its authenticated frame.
pub(super) fn peer_view(f: &Frame) -> PeerView {
    let n = f.resources.len();
    let primary = |r: &ResourceState| Role::from_code(r.role) == Some(Role::Primary);
    PeerView {
        primary: n > 0 && f.resources.iter().all(primary),
        any_primary: f.resources.iter().any(primary),
        uptodate: n > 0
            && f.resources
                .iter()
                .all(|r| DiskState::from_code(r.disk) == Some(DiskState::UpToDate)),
        healthy: f.health == 100,
        diskless: f
            .resources
            .iter()
            .enumerate()
            .filter(|(i, r)| *i < 32 && DiskState::from_code(r.disk) == Some(DiskState::Diskless))
            .fold(0, |m, (i, _)| m | 1 << i),
        unusable: f
            .resources
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                *i < 32
                    && matches!(
                        DiskState::from_code(r.disk),
                        Some(DiskState::Inconsistent | DiskState::Outdated)
                    )
            })
            .fold(0, |m, (i, _)| m | 1 << i),
    }
}

/// What this node sends of one resource.
pub(super) fn resource_state(s: &Summary) -> ResourceState {
    ResourceState {
        role: s.role.code(),
        disk: s.disk.code(),
        conn: s.connection.code(),
        generation: s.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(disk: DiskState, connection: ConnState, peer_disk: Option<DiskState>) -> Summary {
        Summary {
            role: Role::Primary,
            disk,
            connection,
            peer_role: Some(Role::Secondary),
            peer_disk,
            out_of_sync_bytes: 0,
            generation: 1,
            scheduled: false,
            restorable: false,
        }
    }

    #[test]
    fn a_detached_disk_is_marked_and_a_diskless_peer_still_counts_as_in_sync() {
        let v = local_view(&[
            summary(DiskState::Diskless, ConnState::Connected, Some(DiskState::UpToDate)),
            summary(DiskState::UpToDate, ConnState::Connecting, None),
        ]);
        assert_eq!((v.diskless, v.synced, v.disconnected), (0b01, 0b01, 0b10));
        assert_eq!(v.worst_disk, "Diskless");
        assert!(!v.uptodate && !v.in_sync);
        // The slave of a Diskless Primary holds the whole copy.
        let s = summary(DiskState::UpToDate, ConnState::Connected, Some(DiskState::Diskless));
        let v = local_view(&[Summary { role: Role::Secondary, ..s }]);
        assert!(v.in_sync && v.uptodate && v.diskless == 0, "{v:?}");
    }
}
