//! The quorum messages' byte form: one kind byte, then fixed big-endian fields.
//!
//! ```text
//! 1 Request  id u64, term u64, epoch (number u64, members u8)      26 bytes
//! 2 Grant    id u64, epoch                                         18
//! 3 Refuse   id u64, reason u8, then by reason:                    10..19
//!              1 Promised node u8 · 2 Quiet · 3 Outdated epoch · 4 Diskless · 5 Term u64
//! 4 Release  term u64                                               9
//! 5 Propose  epoch                                                 10
//! 6 Stored   number u64                                             9
//! ```
//!
//! The carrier (the heartbeat frame's control body, under its HMAC) authenticates the bytes;
//! this layer checks that they are exactly one well-formed message: a known kind, the exact
//! length, members and node ids within [`MAX_NODES`]. Pure, and never panics on any input.

use super::{Epoch, MAX_NODES, Msg, Refusal};

/// The longest encoded message.
pub const MAX_LEN: usize = 26;

/// Why bytes are not a quorum message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty quorum message")]
    Empty,
    #[error("unknown quorum message kind {0}")]
    Kind(u8),
    #[error("unknown refusal reason {0}")]
    Reason(u8),
    #[error("quorum message kind {kind} is {got} bytes, not {want}")]
    Length { kind: u8, got: usize, want: usize },
    #[error("member set {0:#04x} names a node beyond the fourth")]
    Members(u8),
    #[error("node id {0} is beyond the fourth")]
    Node(u8),
}

const ALL: u8 = (1 << MAX_NODES) - 1;

fn put_epoch(o: &mut Vec<u8>, e: Epoch) {
    o.extend_from_slice(&e.number.to_be_bytes());
    o.push(e.members);
}

/// The bytes of `msg`.
pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut o = Vec::with_capacity(MAX_LEN);
    match *msg {
        Msg::Request { id, term, epoch } => {
            o.push(1);
            o.extend_from_slice(&id.to_be_bytes());
            o.extend_from_slice(&term.to_be_bytes());
            put_epoch(&mut o, epoch);
        }
        Msg::Grant { id, epoch } => {
            o.push(2);
            o.extend_from_slice(&id.to_be_bytes());
            put_epoch(&mut o, epoch);
        }
        Msg::Refuse { id, why } => {
            o.push(3);
            o.extend_from_slice(&id.to_be_bytes());
            match why {
                Refusal::Promised(n) => o.extend_from_slice(&[1, n]),
                Refusal::Quiet => o.push(2),
                Refusal::Outdated(e) => {
                    o.push(3);
                    put_epoch(&mut o, e);
                }
                Refusal::Diskless => o.push(4),
                Refusal::Term(t) => {
                    o.push(5);
                    o.extend_from_slice(&t.to_be_bytes());
                }
            }
        }
        Msg::Release { term } => {
            o.push(4);
            o.extend_from_slice(&term.to_be_bytes());
        }
        Msg::Propose { epoch } => {
            o.push(5);
            put_epoch(&mut o, epoch);
        }
        Msg::Stored { number } => {
            o.push(6);
            o.extend_from_slice(&number.to_be_bytes());
        }
    }
    o
}

/// Reads fixed fields front to back; the caller checked the length first.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let n = self.0.len().min(8);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_be_bytes(b)
    }

    fn epoch(&mut self) -> Result<Epoch, WireError> {
        let number = self.u64();
        let members = self.u8();
        if members & !ALL != 0 {
            return Err(WireError::Members(members));
        }
        Ok(Epoch { number, members })
    }
}

/// One message from exactly `b`.
pub fn decode(b: &[u8]) -> Result<Msg, WireError> {
    let (&kind, body) = b.split_first().ok_or(WireError::Empty)?;
    let want = match kind {
        1 => 25,
        2 => 17,
        3 => match body.get(8) {
            None => 9,
            Some(1) => 10,
            Some(2 | 4) => 9,
            Some(3) => 18,
            Some(5) => 17,
            Some(&r) => return Err(WireError::Reason(r)),
        },
        4 | 6 => 8,
        5 => 9,
        k => return Err(WireError::Kind(k)),
    };
    if body.len() != want {
        return Err(WireError::Length { kind, got: b.len(), want: want + 1 });
    }
    let mut r = Reader(body);
    Ok(match kind {
        1 => Msg::Request { id: r.u64(), term: r.u64(), epoch: r.epoch()? },
        2 => Msg::Grant { id: r.u64(), epoch: r.epoch()? },
        3 => {
            let id = r.u64();
            let why = match r.u8() {
                1 => {
                    let n = r.u8();
                    if usize::from(n) >= MAX_NODES {
                        return Err(WireError::Node(n));
                    }
                    Refusal::Promised(n)
                }
                2 => Refusal::Quiet,
                3 => Refusal::Outdated(r.epoch()?),
                4 => Refusal::Diskless,
                _ => Refusal::Term(r.u64()),
            };
            Msg::Refuse { id, why }
        }
        4 => Msg::Release { term: r.u64() },
        5 => Msg::Propose { epoch: r.epoch()? },
        _ => Msg::Stored { number: r.u64() },
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn epoch() -> impl Strategy<Value = Epoch> {
        (any::<u64>(), 0..=ALL).prop_map(|(number, members)| Epoch { number, members })
    }

    fn refusal() -> impl Strategy<Value = Refusal> {
        prop_oneof![
            (0..4u8).prop_map(Refusal::Promised),
            Just(Refusal::Quiet),
            epoch().prop_map(Refusal::Outdated),
            Just(Refusal::Diskless),
            any::<u64>().prop_map(Refusal::Term),
        ]
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), epoch()).prop_map(|(id, term, epoch)| Msg::Request {
                id,
                term,
                epoch
            }),
            (any::<u64>(), epoch()).prop_map(|(id, epoch)| Msg::Grant { id, epoch }),
            (any::<u64>(), refusal()).prop_map(|(id, why)| Msg::Refuse { id, why }),
            any::<u64>().prop_map(|term| Msg::Release { term }),
            epoch().prop_map(|epoch| Msg::Propose { epoch }),
            any::<u64>().prop_map(|number| Msg::Stored { number }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in msg()) {
            let b = encode(&m);
            prop_assert!(b.len() <= MAX_LEN);
            prop_assert_eq!(decode(&b), Ok(m));
            // Every shorter prefix and any trailing byte are refused.
            for n in 0..b.len() {
                prop_assert!(decode(&b[..n]).is_err());
            }
            let mut longer = b.clone();
            longer.push(0);
            prop_assert!(decode(&longer).is_err());
        }

        #[test]
        fn any_bytes_decode_or_are_refused_and_what_decodes_re_encodes(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(m) = decode(&b) {
                prop_assert_eq!(encode(&m), b);
            }
        }
    }

    #[test]
    fn the_layout_is_as_documented() {
        let e = Epoch { number: 0x0102_0304_0506_0708, members: 0b0101 };
        let b = encode(&Msg::Request { id: 9, term: 3, epoch: e });
        assert_eq!(b.len(), 26);
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..9], &9u64.to_be_bytes());
        assert_eq!(&b[9..17], &3u64.to_be_bytes());
        assert_eq!(&b[17..25], &e.number.to_be_bytes());
        assert_eq!(b[25], 0b0101);
        assert_eq!(encode(&Msg::Refuse { id: 1, why: Refusal::Promised(2) })[9..], [1, 2]);
        assert_eq!(encode(&Msg::Release { term: 7 }).len(), 9);
        assert_eq!(encode(&Msg::Stored { number: 7 }).len(), 9);
        assert_eq!(encode(&Msg::Propose { epoch: e }).len(), 10);
    }

    #[test]
    fn hostile_bytes_get_a_clear_error() {
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(decode(&[0]), Err(WireError::Kind(0)));
        assert_eq!(decode(&[7; 9]), Err(WireError::Kind(7)));
        assert_eq!(decode(&[4, 0, 0]), Err(WireError::Length { kind: 4, got: 3, want: 9 }));
        let mut refuse = vec![3; 9];
        refuse.push(9);
        assert_eq!(decode(&refuse), Err(WireError::Reason(9)));
        let mut promised = vec![3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 4];
        assert_eq!(decode(&promised), Err(WireError::Node(4)));
        promised[10] = 3;
        assert!(decode(&promised).is_ok());
        let mut propose = encode(&Msg::Propose { epoch: Epoch { number: 1, members: 1 } });
        propose[9] = 0x10;
        assert_eq!(decode(&propose), Err(WireError::Members(0x10)));
        // A refusal without its reason byte is a length error, not a panic.
        assert_eq!(
            decode(&[3, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::Length { kind: 3, got: 9, want: 10 })
        );
    }
}
