//! When a replicated write (or flush) may be answered: the protocol's completion rule. Pure:
//! the driver reports events, [`Completion::ready`] says whether and how to reply.
//!
//! - **A**: the local write is done and the data is queued to the peer link;
//! - **B**: the local write is done and the peer acknowledged receipt;
//! - **C**: the local write is done and the peer acknowledged its write.
//!
//! FUA writes and flushes under B wait like C (durable on both nodes, as design.md requires).
//! If the peer goes away before its acknowledgement, the write completes on the local result and
//! the range is marked out of sync (the driver must also have a new current generation persisted
//! before the reply goes out).

use nix::errno::Errno;

/// Replication protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    A,
    B,
    C,
}

/// How a completed request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The reply: the local result.
    pub result: Result<(), Errno>,
    /// The range must be marked out of sync (peer absent, lost, or failed).
    pub out_of_sync: bool,
}

/// Progress of one request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    need: Need,
    local: Option<Result<(), Errno>>,
    queued: bool,
    received: bool,
    written: Option<Result<(), Errno>>,
    lost: bool,
    /// The local disk is detached (or failed under this request): the peer's write is the
    /// only copy, so the reply is the peer's answer whatever the protocol.
    peer_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Queued,
    Received,
    Written,
}

impl Completion {
    /// A request under `protocol`; `durable` for FUA writes and flushes; `replicating` false
    /// when the peer is not connected (then only the local result counts).
    pub fn new(protocol: Protocol, durable: bool, replicating: bool) -> Self {
        let need = match (replicating, protocol, durable) {
            (false, _, _) => Need::Nothing,
            (true, Protocol::A, _) => Need::Queued,
            (true, Protocol::B, false) => Need::Received,
            (true, Protocol::B, true) | (true, Protocol::C, _) => Need::Written,
        };
        Self {
            need,
            local: None,
            queued: false,
            received: false,
            written: None,
            lost: !replicating,
            peer_only: false,
        }
    }

    /// The local part is gone (a Diskless Primary, or the local write failed and the disk was
    /// detached): answered on the peer's write only — its success, its error, or EIO when the
    /// peer is lost before it answers. Never out of sync: there is nothing local to mark.
    pub fn peer_only(&mut self) {
        self.peer_only = true;
        self.local = Some(Ok(()));
    }
    pub fn local_done(&mut self, r: Result<(), Errno>) {
        self.local = Some(r);
    }
    pub fn queued(&mut self) {
        self.queued = true;
    }
    pub fn received(&mut self) {
        self.received = true;
    }
    pub fn written(&mut self, r: Result<(), Errno>) {
        self.received = true;
        self.written = Some(r);
    }
    pub fn peer_lost(&mut self) {
        self.lost = true;
    }

    /// `Some` once the reply may be sent.
    pub fn ready(&self) -> Option<Outcome> {
        if self.peer_only {
            return match self.written {
                Some(r) => Some(Outcome { result: r, out_of_sync: false }),
                None if self.lost => Some(Outcome { result: Err(Errno::EIO), out_of_sync: false }),
                None => None,
            };
        }
        let result = self.local?;
        let peer_ok = match self.need {
            Need::Nothing => true,
            Need::Queued => self.queued,
            Need::Received => self.received,
            Need::Written => self.written.is_some(),
        };
        if !peer_ok && !self.lost {
            return None;
        }
        let failed = matches!(self.written, Some(Err(_)));
        // Under A and B the peer's write may still fail or be lost after we replied; the
        // driver's transfer log marks those ranges later.
        let out_of_sync =
            (self.lost && !peer_ok) || failed || self.need == Need::Nothing || result.is_err();
        Some(Outcome { result, out_of_sync })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Protocol::*;

    fn ok(o: Option<Outcome>) -> bool {
        matches!(o, Some(Outcome { result: Ok(()), out_of_sync: false }))
    }

    #[test]
    fn a_peer_only_request_is_answered_by_the_peer_under_every_protocol() {
        for p in [A, B, C] {
            for durable in [false, true] {
                // The local write failed and the disk was detached: the peer's copy is all.
                let mut c = Completion::new(p, durable, true);
                c.queued();
                c.received();
                c.local_done(Err(Errno::EIO));
                c.peer_only();
                assert_eq!(c.ready(), None, "{p:?}: waits for the peer's write");
                c.written(Ok(()));
                assert!(ok(c.ready()), "{p:?}");
                let mut c = Completion::new(p, durable, true);
                c.peer_only();
                c.written(Err(Errno::ENOSPC));
                assert_eq!(
                    c.ready(),
                    Some(Outcome { result: Err(Errno::ENOSPC), out_of_sync: false })
                );
                let mut c = Completion::new(p, durable, true);
                c.peer_only();
                c.queued();
                c.peer_lost();
                assert_eq!(
                    c.ready(),
                    Some(Outcome { result: Err(Errno::EIO), out_of_sync: false }),
                    "{p:?}: nowhere written is an error, never a success"
                );
                let mut c = Completion::new(p, durable, false);
                c.peer_only();
                assert_eq!(
                    c.ready(),
                    Some(Outcome { result: Err(Errno::EIO), out_of_sync: false })
                );
            }
        }
    }

    #[test]
    fn protocol_a_needs_local_and_queued() {
        let mut c = Completion::new(A, false, true);
        c.queued();
        assert_eq!(c.ready(), None, "local not done");
        c.local_done(Ok(()));
        assert!(ok(c.ready()));
        let mut c = Completion::new(A, true, true);
        c.local_done(Ok(()));
        assert_eq!(c.ready(), None, "not yet queued");
        c.queued();
        assert!(ok(c.ready()), "FUA under A: local durability and queued");
    }

    #[test]
    fn protocol_b_needs_receipt_and_writes_for_fua() {
        let mut c = Completion::new(B, false, true);
        c.local_done(Ok(()));
        c.queued();
        assert_eq!(c.ready(), None);
        c.received();
        assert!(ok(c.ready()));
        let mut c = Completion::new(B, true, true);
        c.local_done(Ok(()));
        c.received();
        assert_eq!(c.ready(), None, "FUA/flush under B waits for the peer's durable write");
        c.written(Ok(()));
        assert!(ok(c.ready()));
    }

    #[test]
    fn protocol_c_needs_the_peer_write() {
        let mut c = Completion::new(C, false, true);
        c.queued();
        c.received();
        c.written(Ok(()));
        assert_eq!(c.ready(), None, "local not done");
        c.local_done(Ok(()));
        assert!(ok(c.ready()));
        let mut c = Completion::new(C, false, true);
        c.local_done(Ok(()));
        c.received();
        assert_eq!(c.ready(), None);
    }

    #[test]
    fn lost_or_absent_peer_completes_out_of_sync() {
        for p in [A, B, C] {
            let mut c = Completion::new(p, false, true);
            c.local_done(Ok(()));
            c.peer_lost();
            assert_eq!(c.ready(), Some(Outcome { result: Ok(()), out_of_sync: true }), "{p:?}");
            let mut c = Completion::new(p, false, false);
            c.local_done(Ok(()));
            assert_eq!(c.ready(), Some(Outcome { result: Ok(()), out_of_sync: true }));
        }
        // Peer loss after the acknowledgement is not out of sync for C.
        let mut c = Completion::new(C, false, true);
        c.local_done(Ok(()));
        c.written(Ok(()));
        c.peer_lost();
        assert!(ok(c.ready()));
    }

    #[test]
    fn failures() {
        let mut c = Completion::new(C, false, true);
        c.written(Err(Errno::EIO));
        c.local_done(Ok(()));
        assert_eq!(c.ready(), Some(Outcome { result: Ok(()), out_of_sync: true }));
        let mut c = Completion::new(C, false, true);
        c.written(Ok(()));
        c.local_done(Err(Errno::EIO));
        assert_eq!(c.ready(), Some(Outcome { result: Err(Errno::EIO), out_of_sync: true }));
    }
}
