//! What happens to received bytes before anyone believes them: decode, pick the key by id,
//! authenticate, check the cluster and the sender, then the replay window. Every drop is counted
//! by reason (the runtime logs drops through a rate limiter).

use crate::frame::{Frame, FrameError};
use crate::replay::{AHEAD, Checkpoint, Replay, STRIDE, Window};

/// Why a received frame was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// Not a well-formed frame.
    #[error("malformed frame: {0}")]
    Malformed(FrameError),
    /// Signed with a key id this node does not have.
    #[error("unknown key id {0}")]
    KeyId(u8),
    /// Bad MAC: wrong secret or tampered.
    #[error("authentication failed: wrong secret or tampered frame")]
    Auth,
    /// Authentic but from another cluster (same secret reused across clusters).
    #[error("frame of another cluster (id {0:016x})")]
    Cluster(u64),
    /// Authentic but not from the peer (our own frame looped back, or a third node).
    #[error("frame from node id {0}, not from the peer")]
    Node(u8),
    /// Seen before, or from an older boot.
    #[error("{0}")]
    Replay(Replay),
}

/// Drop counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub malformed: u64,
    pub auth: u64,
    pub cluster: u64,
    pub node: u64,
    pub replay: u64,
}

impl DropCounts {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.malformed + self.auth + self.cluster + self.node + self.replay
    }
}

/// Accepts frames from one peer.
#[derive(Debug)]
pub struct Receiver {
    keys: Vec<(u8, Vec<u8>)>,
    cluster: u64,
    peer: u8,
    window: Window,
    /// The checkpoint on disk; one being written; one to write (see [`Receiver::take_due`]).
    durable: Option<Checkpoint>,
    writing: Option<Checkpoint>,
    due: Option<Checkpoint>,
    /// The newest frame version accepted.
    max_version: u8,
    /// Counted drops.
    pub drops: DropCounts,
    /// Frames accepted.
    pub accepted: u64,
}

impl Receiver {
    /// `keys`: (key id, secret) pairs this node accepts; `cluster`: our cluster id; `peer`: the
    /// peer's node id.
    pub fn new(keys: Vec<(u8, Vec<u8>)>, cluster: u64, peer: u8) -> Self {
        Self {
            keys,
            cluster,
            peer,
            window: Window::default(),
            durable: None,
            writing: None,
            due: None,
            max_version: crate::frame::VERSION,
            drops: DropCounts::default(),
            accepted: 0,
        }
    }

    /// Refuses frames newer than `v` (a node held to an older version, as that release would).
    #[must_use]
    pub fn max_version(mut self, v: u8) -> Self {
        self.max_version = v;
        self
    }

    /// After a restart: the sender's window as the checkpoint on disk left it.
    #[must_use]
    pub fn resume(mut self, c: Option<Checkpoint>) -> Self {
        if let Some(c) = c {
            self.window = Window::resume(c);
            self.durable = Some(c);
        }
        self
    }

    /// A checkpoint to write now (in the background: the caller goes on receiving), `None`
    /// when the one on disk or the one being written reaches far enough ahead. Taking it marks
    /// it as being written; report the end with [`Receiver::made_durable`] or
    /// [`Receiver::write_failed`].
    pub fn take_due(&mut self) -> Option<Checkpoint> {
        let c = self.due.take()?;
        self.writing = Some(c);
        Some(c)
    }

    /// The checkpoint is on disk.
    pub fn made_durable(&mut self, c: Checkpoint) {
        if self.durable.is_none_or(|d| (c.boot, c.ceiling) > (d.boot, d.ceiling)) {
            self.durable = Some(c);
        }
        if self.writing == Some(c) {
            self.writing = None;
        }
    }

    /// Writing the checkpoint failed: the next accepted frame asks for one again.
    pub fn write_failed(&mut self, c: Checkpoint) {
        if self.writing == Some(c) {
            self.writing = None;
        }
    }

    /// Whether the checkpoint on disk covers `f`, an accepted frame: after a restart it is a
    /// replay. Act on a frame only once it is covered (or once writing its checkpoint failed:
    /// the caller's choice).
    pub fn covers(&self, f: &Frame) -> bool {
        self.durable.is_some_and(|d| d.boot == f.boot && f.seq <= d.ceiling)
    }

    /// Checks one frame's bytes.
    pub fn receive(&mut self, b: &[u8]) -> Result<Frame, Dropped> {
        let r = self.check(b);
        match &r {
            Ok(_) => self.accepted += 1,
            Err(Dropped::Malformed(_) | Dropped::KeyId(_)) => self.drops.malformed += 1,
            Err(Dropped::Auth) => self.drops.auth += 1,
            Err(Dropped::Cluster(_)) => self.drops.cluster += 1,
            Err(Dropped::Node(_)) => self.drops.node += 1,
            Err(Dropped::Replay(_)) => self.drops.replay += 1,
        }
        r
    }

    fn check(&mut self, b: &[u8]) -> Result<Frame, Dropped> {
        Frame::announced_len(b).map_err(Dropped::Malformed)?;
        if b[4] > self.max_version {
            return Err(Dropped::Malformed(FrameError::Version(b[4])));
        }
        let kid = b[5];
        let key = self.keys.iter().find(|(k, _)| *k == kid).ok_or(Dropped::KeyId(kid))?;
        let f = Frame::decode(b, &key.1).map_err(|e| match e {
            FrameError::Mac => Dropped::Auth,
            e => Dropped::Malformed(e),
        })?;
        if f.cluster != self.cluster {
            return Err(Dropped::Cluster(f.cluster));
        }
        if f.node_id != self.peer {
            return Err(Dropped::Node(f.node_id));
        }
        self.window.accept(f.boot, f.seq).map_err(Dropped::Replay)?;
        let far = |c: Option<Checkpoint>| {
            c.is_some_and(|c| c.boot == f.boot && c.ceiling >= f.seq.saturating_add(AHEAD))
        };
        // One write at a time (they replace the same file): the next is asked for by the first
        // frame after it ends.
        let writing = self.writing.is_some();
        if !far(self.durable) && !writing && !far(self.due) {
            self.due = Some(Checkpoint { boot: f.boot, ceiling: f.seq.saturating_add(STRIDE) });
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ResourceState, cluster_id};

    const KEY: &[u8] = b"secret-one";

    fn frame(node: u8, cluster: &str, boot: u64, seq: u64) -> Frame {
        Frame {
            version: crate::frame::VERSION,
            key_id: 1,
            node_id: node,
            cluster: cluster_id(cluster),
            boot,
            seq,
            health: 100,
            maintenance: crate::frame::Maintenance::default(),
            resources: vec![ResourceState::default()],
            control: None,
        }
    }

    fn rx() -> Receiver {
        Receiver::new(vec![(1, KEY.to_vec())], cluster_id("c"), 1)
    }

    /// A checkpoint is due before the first frame of a boot and then about every STRIDE/2
    /// frames, ahead of the frames; a receiver resumed from it refuses every frame it had
    /// accepted.
    #[test]
    fn checkpoints_cover_every_accepted_frame_across_a_restart() {
        let mut r = rx();
        let mut written = Vec::new();
        for seq in 1..=100 {
            let f = r.receive(&frame(1, "c", 9, seq).encode(KEY)).unwrap();
            if let Some(c) = r.take_due() {
                assert!(c.ceiling >= seq + AHEAD && c.boot == 9);
                r.made_durable(c);
                written.push(c);
            }
            assert!(r.covers(&f), "seq {seq}");
            assert_eq!(r.take_due(), None);
        }
        assert_eq!(written.len(), 6, "{written:?}");
        let last = *written.last().unwrap();
        let mut again = rx().resume(Some(last));
        for seq in 1..=100 {
            let e = again.receive(&frame(1, "c", 9, seq).encode(KEY)).unwrap_err();
            assert!(matches!(e, Dropped::Replay(_)), "seq {seq}: {e:?}");
        }
        assert_eq!(again.drops.replay, 100);
        // Live frames beyond the ceiling are heard, and a new boot at once.
        let f = again.receive(&frame(1, "c", 9, last.ceiling + 1).encode(KEY)).unwrap();
        assert!(!again.covers(&f));
        assert!(again.receive(&frame(1, "c", 10, 0).encode(KEY)).is_ok());
        assert_eq!(again.take_due(), Some(Checkpoint { boot: 10, ceiling: STRIDE }));
    }

    /// While a checkpoint is written, frames below the durable ceiling are covered at once;
    /// past it they wait for the write (nothing asks for a second one meanwhile); a failed
    /// write is asked for again.
    #[test]
    fn the_next_checkpoint_is_written_ahead_of_the_frames() {
        let mut r = rx();
        let f = r.receive(&frame(1, "c", 3, 1).encode(KEY)).unwrap();
        let first = r.take_due().unwrap();
        assert!(!r.covers(&f), "not durable yet");
        r.made_durable(first);
        assert!(r.covers(&f));
        // Close to the ceiling: the next one is due while the frames are still covered.
        let near = first.ceiling - AHEAD + 1;
        let f = r.receive(&frame(1, "c", 3, near).encode(KEY)).unwrap();
        assert!(r.covers(&f));
        let next = r.take_due().expect("asked for ahead of time");
        assert!(next.ceiling > first.ceiling);
        // A slow write: frames up to the old ceiling are covered, later ones wait, and no
        // second write is asked for.
        for seq in near + 1..=first.ceiling + 3 {
            let f = r.receive(&frame(1, "c", 3, seq).encode(KEY)).unwrap();
            assert_eq!(r.covers(&f), seq <= first.ceiling, "seq {seq}");
            assert_eq!(r.take_due(), None, "seq {seq}");
        }
        r.write_failed(next);
        let f = r.receive(&frame(1, "c", 3, first.ceiling + 4).encode(KEY)).unwrap();
        let retry = r.take_due().expect("asked again after the failure");
        r.made_durable(retry);
        assert!(r.covers(&f));
        // An older checkpoint finishing late never lowers the durable one.
        r.made_durable(first);
        assert!(r.covers(&f));
        // A new boot while a write runs waits for it: never two writes at once.
        let _ = r.receive(&frame(1, "c", 3, first.ceiling + 30).encode(KEY)).unwrap();
        let busy = r.take_due().expect("due");
        let f = r.receive(&frame(1, "c", 4, 1).encode(KEY)).unwrap();
        assert_eq!(r.take_due(), None, "a second write while one runs");
        r.made_durable(busy);
        assert!(!r.covers(&f));
        let _ = r.receive(&frame(1, "c", 4, 2).encode(KEY)).unwrap();
        let next = r.take_due().expect("the new boot's checkpoint after the write");
        assert_eq!(next.boot, 4);
        r.made_durable(next);
        assert!(r.covers(&f));
    }

    #[test]
    fn good_frames_pass_and_bad_ones_are_counted_by_reason() {
        let mut r = rx();
        assert!(r.receive(&frame(1, "c", 1, 1).encode(KEY)).is_ok());
        assert_eq!(r.receive(&frame(1, "c", 1, 2).encode(b"wrong")), Err(Dropped::Auth));
        assert_eq!(
            r.receive(&frame(1, "other", 1, 3).encode(KEY)),
            Err(Dropped::Cluster(cluster_id("other")))
        );
        assert_eq!(r.receive(&frame(0, "c", 1, 4).encode(KEY)), Err(Dropped::Node(0)));
        let again = frame(1, "c", 1, 1).encode(KEY);
        assert!(matches!(r.receive(&again), Err(Dropped::Replay(Replay::Duplicate { got: 1 }))));
        let mut other_key = frame(1, "c", 1, 5);
        other_key.key_id = 2;
        assert_eq!(r.receive(&other_key.encode(KEY)), Err(Dropped::KeyId(2)));
        assert!(matches!(r.receive(b"short"), Err(Dropped::Malformed(FrameError::Incomplete))));
        assert_eq!(r.drops, DropCounts { malformed: 2, auth: 1, cluster: 1, node: 1, replay: 1 });
        assert_eq!(r.accepted, 1);
        assert_eq!(r.drops.total(), 6);
    }

    #[test]
    fn a_forged_frame_does_not_move_the_window() {
        let mut r = rx();
        r.receive(&frame(1, "c", 1, 10).encode(KEY)).expect("good");
        // A forged frame with a huge sequence is refused by the MAC and must not advance the
        // window, or the real peer's next frames would look like replays.
        assert_eq!(r.receive(&frame(1, "c", 1, 1 << 40).encode(b"forged")), Err(Dropped::Auth));
        assert!(r.receive(&frame(1, "c", 1, 11).encode(KEY)).is_ok());
    }
}
