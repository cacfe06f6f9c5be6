//! The anti-replay window. A sender numbers every frame it transmits, on any link, from one
//! counter that restarts with each boot generation. The receiver accepts a frame once: a newer
//! boot generation resets the window; within a boot, a sequence above the highest seen moves the
//! window up, one inside the window is accepted if not seen yet (links deliver out of order: the
//! serial line lags the UDP link), and anything older or seen is a replay.

/// How many sequence numbers below the highest the window remembers.
pub const WINDOW: u64 = 128;
/// How far ahead of the newest accepted sequence a [`Checkpoint`] reaches: about one durable
/// write per half this many frames, and at most this many live frames refused after the
/// receiver restarts (3.2 s at the default keepalive over two links).
pub const STRIDE: u64 = 32;
/// The next checkpoint is asked for once the newest accepted sequence comes this close to the
/// durable ceiling, so it is written while frames below the ceiling are still arriving: a
/// slow disk (an fsync behind a large writeback) delays nothing unless it takes longer than
/// this many frames.
pub const AHEAD: u64 = STRIDE / 2;

/// What a receiver keeps on disk about a sender, so its window survives a restart: frames of
/// `boot` up to `ceiling` are refused after it (every frame accepted before was below it), and
/// frames of older boots always are. Made durable before a frame it covers is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub boot: u64,
    pub ceiling: u64,
}

/// Why a frame was refused as a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Replay {
    /// From an older boot of the sender.
    #[error("replayed frame: boot generation {got} is older than the peer's current {current}")]
    OldBoot { got: u64, current: u64 },
    /// Below the window.
    #[error("replayed frame: sequence {got} is too old (newest seen {top})")]
    TooOld { got: u64, top: u64 },
    /// Seen already.
    #[error("replayed frame: sequence {got} was already received")]
    Duplicate { got: u64 },
}

/// The receiver's window for one sender.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// (boot generation, highest sequence, bit i = top - i seen).
    state: Option<(u64, u64, u128)>,
}

impl Window {
    /// The window after a restart: everything of the checkpoint's boot up to its ceiling, and
    /// every older boot, is a replay.
    pub fn resume(c: Checkpoint) -> Self {
        Self { state: Some((c.boot, c.ceiling, u128::MAX)) }
    }

    /// Checks a frame's (boot, seq) and records it if accepted. Call only for authenticated
    /// frames, so a forged frame cannot move the window.
    pub fn accept(&mut self, boot: u64, seq: u64) -> Result<(), Replay> {
        let Some((b, top, bits)) = self.state else {
            self.state = Some((boot, seq, 1));
            return Ok(());
        };
        if boot < b {
            return Err(Replay::OldBoot { got: boot, current: b });
        }
        if boot > b {
            self.state = Some((boot, seq, 1));
            return Ok(());
        }
        if seq > top {
            let shift = seq - top;
            let bits = if shift >= WINDOW { 0 } else { bits << shift };
            self.state = Some((b, seq, bits | 1));
            return Ok(());
        }
        let back = top - seq;
        if back >= WINDOW {
            return Err(Replay::TooOld { got: seq, top });
        }
        if bits & (1u128 << back) != 0 {
            return Err(Replay::Duplicate { got: seq });
        }
        self.state = Some((b, top, bits | (1u128 << back)));
        Ok(())
    }

    /// The sender's boot generation, once heard.
    pub fn boot(&self) -> Option<u64> {
        self.state.map(|s| s.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_and_reordered_frames_are_accepted_once() {
        let mut w = Window::default();
        assert_eq!(w.accept(5, 10), Ok(()));
        assert_eq!(w.accept(5, 12), Ok(()));
        assert_eq!(w.accept(5, 11), Ok(()), "late but inside the window");
        assert_eq!(w.accept(5, 11), Err(Replay::Duplicate { got: 11 }));
        assert_eq!(w.accept(5, 12), Err(Replay::Duplicate { got: 12 }));
        assert_eq!(w.accept(5, 10), Err(Replay::Duplicate { got: 10 }));
        assert_eq!(w.accept(5, 200), Ok(()));
        assert_eq!(w.accept(5, 72), Err(Replay::TooOld { got: 72, top: 200 }));
        assert_eq!(w.accept(5, 73), Ok(()), "the window's last slot");
    }

    #[test]
    fn boot_generations_order_frames() {
        let mut w = Window::default();
        assert_eq!(w.accept(5, 1000), Ok(()));
        assert_eq!(w.accept(6, 1), Ok(()), "the peer restarted");
        assert_eq!(w.accept(5, 1001), Err(Replay::OldBoot { got: 5, current: 6 }));
        assert_eq!(w.boot(), Some(6));
    }

    #[test]
    fn a_resumed_window_refuses_what_the_checkpoint_covers() {
        let c = Checkpoint { boot: 7, ceiling: 40 };
        let mut w = Window::resume(c);
        assert_eq!(w.accept(6, 1000), Err(Replay::OldBoot { got: 6, current: 7 }));
        assert_eq!(w.accept(7, 33), Err(Replay::Duplicate { got: 33 }));
        assert_eq!(w.accept(7, 40), Err(Replay::Duplicate { got: 40 }));
        assert_eq!(w.accept(7, 1), Err(Replay::Duplicate { got: 1 }));
        assert_eq!(w.accept(7, 41), Ok(()));
        assert_eq!(w.accept(7, 39), Err(Replay::Duplicate { got: 39 }), "still covered");
        let mut w = Window::resume(c);
        assert_eq!(w.accept(8, 0), Ok(()), "the sender restarted too");
    }

    #[test]
    fn a_jump_past_the_window_forgets_everything_below() {
        let mut w = Window::default();
        w.accept(1, 1).expect("first");
        w.accept(1, 1 + WINDOW * 3).expect("jump");
        assert_eq!(w.accept(1, 1), Err(Replay::TooOld { got: 1, top: 1 + WINDOW * 3 }));
    }

    proptest! {
        /// Whatever order the frames of one boot arrive in, each sequence number is accepted at
        /// most once, and every frame not older than the window below the top is accepted.
        #[test]
        fn each_sequence_accepted_at_most_once(seqs in proptest::collection::vec(0u64..400, 1..300)) {
            let mut w = Window::default();
            let mut accepted = std::collections::HashSet::new();
            let mut top = 0u64;
            let mut first = true;
            for s in seqs {
                let fresh = !accepted.contains(&s) && (first || s > top || top - s < WINDOW);
                let r = w.accept(9, s);
                prop_assert_eq!(r.is_ok(), fresh, "seq {} top {}", s, top);
                if r.is_ok() {
                    accepted.insert(s);
                    top = if first { s } else { top.max(s) };
                    first = false;
                }
            }
        }
    }
}
