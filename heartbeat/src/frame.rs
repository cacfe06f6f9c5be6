//! The heartbeat frame: who sends it (cluster, node, boot generation, sequence), the sender's
//! state (health, maintenance mode and, per resource, role, disk, connection and current
//! generation), at most one control message, and an HMAC-SHA256 over everything before it.
//!
//! Layout (big-endian):
//!
//! ```text
//!  0  magic "DUHB"      4      28  sequence           8
//!  4  version           1      36  health 0..=100     1
//!  5  key id            1      37  resource count     1
//!  6  node id           1      38  control length     2
//!  7  flags             1      40  maintenance stamp  8
//!  8  cluster id        8      48  resources, 12 each: role, disk, conn, 0, generation (8)
//! 16  boot generation   8      ..  control body (see `Control`)
//! 24  frame length      4      ..  HMAC-SHA256 (32) of every byte before it
//! ```
//!
//! Flags: bit 0 = maintenance mode on; the other bits are 0. The maintenance stamp orders the
//! operator's changes of the mode (see [`Maintenance`]). Version 1 (duet before maintenance
//! mode) had neither: byte 7 was 0 and the resources began at 40. Both are decoded; a node
//! sends what its peer speaks (see [`Versions`]), so a pair upgrades one node at a time.
//!
//! Decoding is pure and tells "not a whole frame yet" apart from "invalid".

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// "DUHB".
pub const MAGIC: [u8; 4] = *b"DUHB";
/// The version this build speaks.
pub const VERSION: u8 = 2;
/// The oldest version this build still speaks.
pub const MIN_VERSION: u8 = 1;
/// Fixed part before the resources (this version's; see [`header_len`]).
pub const HEADER_LEN: usize = 48;

/// The fixed part of a frame of `version` (one this build speaks).
pub fn header_len(version: u8) -> usize {
    if version == 1 { 40 } else { HEADER_LEN }
}
/// Flag bit: maintenance mode is on.
const FLAG_MAINTENANCE: u8 = 1;
/// Bytes per resource entry.
pub const RESOURCE_LEN: usize = 12;
/// Most resources one frame describes.
pub const MAX_RESOURCES: usize = 32;
/// Longest control body.
pub const MAX_CONTROL: usize = 512;
/// HMAC-SHA256 length.
pub const MAC_LEN: usize = 32;
/// Longest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_RESOURCES * RESOURCE_LEN + MAX_CONTROL + MAC_LEN;
/// Longest reason text in a control reply.
pub const MAX_REASON: usize = 400;

type HmacSha256 = Hmac<Sha256>;

/// One resource's state as the sender sees it (numbers as the replicator's enums order them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceState {
    /// 0 Secondary, 1 Primary.
    pub role: u8,
    /// 0 Inconsistent, 1 Outdated, 2 Consistent, 3 UpToDate, 4 Diskless.
    pub disk: u8,
    /// 0 StandAlone/Connecting (not connected), 1 Connected, 2 SyncSource, 3 SyncTarget,
    /// 4 Verify (either side).
    pub conn: u8,
    /// Current generation UUID.
    pub generation: u64,
}

/// The cluster-wide maintenance mode as a node knows it: on or off, and the stamp of the
/// operator's command that set it. Each node sends its own in every frame and takes the
/// peer's when it is newer, so the last command wins on both nodes, whichever node it ran on
/// and even if the other was away: a command's stamp is above every stamp its node knew.
/// Equal stamps with different modes (two commands in the same millisecond, one per side of
/// a partition) resolve to on, where nothing happens by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Maintenance {
    /// Compared first: the newer command wins.
    pub stamp: u64,
    pub on: bool,
}

impl Maintenance {
    /// The state a command setting `on` makes, given the newest state this node knows and the
    /// wall clock in milliseconds since the Unix epoch.
    pub fn set(known: Maintenance, on: bool, now_ms: u64) -> Maintenance {
        Maintenance { stamp: now_ms.max(known.stamp.saturating_add(1)), on }
    }
}

/// Which frame versions a node sends its peer, so two releases talk during a rolling upgrade:
/// until the peer is heard, one frame of every version this node speaks per keepalive (a peer
/// drops those it cannot read, counted as malformed); then the highest version heard from the
/// peer's current boot. Highest, not latest: a new node hears its old-speaking partner first,
/// and each side moves up as soon as the other shows it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    max: u8,
    /// (the peer's boot, the highest version heard from it).
    peer: Option<(u64, u8)>,
}

impl Versions {
    /// A node that speaks up to `max` (normally [`VERSION`]).
    pub fn new(max: u8) -> Self {
        Self { max: max.clamp(MIN_VERSION, VERSION), peer: None }
    }

    /// The highest version this node speaks.
    pub fn max(&self) -> u8 {
        self.max
    }

    /// An authenticated frame of `version` from the peer's boot `boot` was accepted.
    pub fn heard(&mut self, boot: u64, version: u8) {
        self.peer = Some(match self.peer {
            Some((b, v)) if b == boot => (b, v.max(version)),
            Some((b, v)) if b > boot => (b, v),
            _ => (boot, version),
        });
    }

    /// The versions to send, one frame each, every keepalive.
    pub fn to_send(&self) -> std::ops::RangeInclusive<u8> {
        match self.peer {
            None => MIN_VERSION..=self.max,
            Some((_, v)) => {
                let v = v.min(self.max);
                v..=v
            }
        }
    }
}

/// A control message riding in a frame. Requests carry an id; replies echo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// From a Primary whose replication link broke: mark the resources in `mask` Outdated.
    Outdate { id: u64, mask: u32 },
    /// The resources in `mask` are now Outdated on disk.
    Outdated { id: u64, mask: u32 },
    /// "I am taking over": close your exports, stop your services, demote.
    Release { id: u64 },
    /// Reply to `Release`.
    Released { id: u64, ok: bool, reason: String },
    /// "Take over from me" (make-slave, or a health handover).
    TakeOver { id: u64, force: bool },
    /// Reply to `TakeOver`.
    TookOver { id: u64, ok: bool, reason: String },
}

impl Control {
    /// The request id this message carries or answers.
    pub fn id(&self) -> u64 {
        match self {
            Self::Outdate { id, .. }
            | Self::Outdated { id, .. }
            | Self::Release { id }
            | Self::Released { id, .. }
            | Self::TakeOver { id, .. }
            | Self::TookOver { id, .. } => *id,
        }
    }
}

/// A decoded heartbeat frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame format ([`MIN_VERSION`]..=[`VERSION`]); a version-1 frame carries no
    /// maintenance mode, and a Diskless disk goes out as Inconsistent (version 1 has no code
    /// for it: never a failover target either way).
    pub version: u8,
    pub key_id: u8,
    pub node_id: u8,
    pub cluster: u64,
    pub boot: u64,
    pub seq: u64,
    pub health: u8,
    pub maintenance: Maintenance,
    pub resources: Vec<ResourceState>,
    pub control: Option<Control>,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed (a stream transport keeps reading).
    #[error("incomplete frame")]
    Incomplete,
    /// Not a duet heartbeat frame.
    #[error("bad magic")]
    Magic,
    /// Another protocol version.
    #[error("unsupported heartbeat version {0} (this build speaks {MIN_VERSION} to {VERSION})")]
    Version(u8),
    /// A length field out of bounds.
    #[error("bad length: {0}")]
    Length(&'static str),
    /// A field with a value this version does not know.
    #[error("bad field: {0}")]
    Field(&'static str),
    /// The MAC does not match (wrong secret, or tampered).
    #[error("authentication failed (wrong secret or tampered frame)")]
    Mac,
}

/// The cluster id carried in frames: a 64-bit FNV-1a hash of the cluster name.
pub fn cluster_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn control_kind(c: &Control) -> u8 {
    match c {
        Control::Outdate { .. } => 1,
        Control::Outdated { .. } => 2,
        Control::Release { .. } => 3,
        Control::Released { .. } => 4,
        Control::TakeOver { .. } => 5,
        Control::TookOver { .. } => 6,
    }
}

fn encode_control(c: &Control, o: &mut Vec<u8>) {
    o.push(control_kind(c));
    o.extend_from_slice(&c.id().to_be_bytes());
    match c {
        Control::Outdate { mask, .. } | Control::Outdated { mask, .. } => {
            o.extend_from_slice(&mask.to_be_bytes());
        }
        Control::Release { .. } => {}
        Control::TakeOver { force, .. } => o.push(u8::from(*force)),
        Control::Released { ok, reason, .. } | Control::TookOver { ok, reason, .. } => {
            o.push(u8::from(*ok));
            let r = truncate(reason, MAX_REASON);
            o.extend_from_slice(&u16::try_from(r.len()).unwrap_or(0).to_be_bytes());
            o.extend_from_slice(r.as_bytes());
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn decode_control(b: &[u8]) -> Result<Control, FrameError> {
    let bad = FrameError::Field("control body");
    if b.len() < 9 {
        return Err(bad);
    }
    let kind = b[0];
    let id = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
    let rest = &b[9..];
    let c = match kind {
        1 | 2 => {
            let mask = u32::from_be_bytes(rest.try_into().map_err(|_| bad.clone())?);
            if kind == 1 { Control::Outdate { id, mask } } else { Control::Outdated { id, mask } }
        }
        3 if rest.is_empty() => Control::Release { id },
        5 if rest.len() == 1 && rest[0] <= 1 => Control::TakeOver { id, force: rest[0] == 1 },
        4 | 6 => {
            if rest.len() < 3 || rest[0] > 1 {
                return Err(bad);
            }
            let ok = rest[0] == 1;
            let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            if n > MAX_REASON || rest.len() != 3 + n {
                return Err(bad);
            }
            let reason = std::str::from_utf8(&rest[3..]).map_err(|_| bad.clone())?.to_string();
            if kind == 4 {
                Control::Released { id, ok, reason }
            } else {
                Control::TookOver { id, ok, reason }
            }
        }
        _ => return Err(bad),
    };
    Ok(c)
}

fn mac(key: &[u8], bytes: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(bytes);
    m
}

impl Frame {
    /// Encodes and signs the frame. Resources past `MAX_RESOURCES` are not sent (the config
    /// refuses more); a control body is always short enough by construction.
    pub fn encode(&self, key: &[u8]) -> Vec<u8> {
        let res = &self.resources[..self.resources.len().min(MAX_RESOURCES)];
        let mut body = Vec::new();
        if let Some(c) = &self.control {
            encode_control(c, &mut body);
        }
        let v1 = self.version == 1;
        let total = header_len(self.version) + res.len() * RESOURCE_LEN + body.len() + MAC_LEN;
        let mut o = Vec::with_capacity(total);
        o.extend_from_slice(&MAGIC);
        o.push(if v1 { 1 } else { VERSION });
        o.push(self.key_id);
        o.push(self.node_id);
        o.push(if self.maintenance.on && !v1 { FLAG_MAINTENANCE } else { 0 });
        o.extend_from_slice(&self.cluster.to_be_bytes());
        o.extend_from_slice(&self.boot.to_be_bytes());
        o.extend_from_slice(&u32::try_from(total).expect("frames are small").to_be_bytes());
        o.extend_from_slice(&self.seq.to_be_bytes());
        o.push(self.health.min(100));
        o.push(u8::try_from(res.len()).expect("at most MAX_RESOURCES"));
        o.extend_from_slice(&u16::try_from(body.len()).expect("short body").to_be_bytes());
        if !v1 {
            o.extend_from_slice(&self.maintenance.stamp.to_be_bytes());
        }
        for r in res {
            let disk = if v1 && r.disk > 3 { 0 } else { r.disk };
            o.extend_from_slice(&[r.role, disk, r.conn, 0]);
            o.extend_from_slice(&r.generation.to_be_bytes());
        }
        o.extend_from_slice(&body);
        let tag = mac(key, &o).finalize().into_bytes();
        o.extend_from_slice(&tag);
        o
    }

    /// The frame length announced by a buffer's first bytes, once `HEADER_LEN` bytes are there.
    pub fn announced_len(b: &[u8]) -> Result<usize, FrameError> {
        if b.len() < header_len(1) {
            return Err(FrameError::Incomplete);
        }
        if b[0..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        if !(MIN_VERSION..=VERSION).contains(&b[4]) {
            return Err(FrameError::Version(b[4]));
        }
        let hl = header_len(b[4]);
        if b.len() < hl {
            return Err(FrameError::Incomplete);
        }
        let total = u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")) as usize;
        if !(hl + MAC_LEN..=MAX_FRAME).contains(&total) {
            return Err(FrameError::Length("frame length"));
        }
        Ok(total)
    }

    /// Decodes and authenticates exactly one frame (`b` must be the whole frame). The MAC is
    /// checked before any field is trusted beyond the lengths needed to find it.
    pub fn decode(b: &[u8], key: &[u8]) -> Result<Frame, FrameError> {
        let total = Self::announced_len(b)?;
        if b.len() < total {
            return Err(FrameError::Incomplete);
        }
        if b.len() > total {
            return Err(FrameError::Length("trailing bytes after the frame"));
        }
        let nres = usize::from(b[37]);
        let nctl = usize::from(u16::from_be_bytes([b[38], b[39]]));
        if nres > MAX_RESOURCES {
            return Err(FrameError::Length("resource count"));
        }
        if nctl > MAX_CONTROL {
            return Err(FrameError::Length("control length"));
        }
        let version = b[4];
        let hl = header_len(version);
        if hl + nres * RESOURCE_LEN + nctl + MAC_LEN != total {
            return Err(FrameError::Length("parts do not add up to the frame length"));
        }
        let (signed, tag) = b.split_at(total - MAC_LEN);
        mac(key, signed).verify_slice(tag).map_err(|_| FrameError::Mac)?;
        let flags = if version == 1 { 0 } else { FLAG_MAINTENANCE };
        if b[7] & !flags != 0 {
            return Err(FrameError::Field(if version == 1 { "reserved" } else { "flags" }));
        }
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let health = b[36];
        if health > 100 {
            return Err(FrameError::Field("health"));
        }
        let mut resources = Vec::with_capacity(nres);
        for i in 0..nres {
            let o = hl + i * RESOURCE_LEN;
            let r = ResourceState {
                role: b[o],
                disk: b[o + 1],
                conn: b[o + 2],
                generation: u64_at(o + 4),
            };
            let max_disk = if version == 1 { 3 } else { 4 };
            if r.role > 1 || r.disk > max_disk || r.conn > 4 || b[o + 3] != 0 {
                return Err(FrameError::Field("resource state"));
            }
            resources.push(r);
        }
        let c0 = hl + nres * RESOURCE_LEN;
        let control = if nctl == 0 { None } else { Some(decode_control(&b[c0..c0 + nctl])?) };
        let maintenance = if version == 1 {
            Maintenance::default()
        } else {
            Maintenance { on: b[7] & FLAG_MAINTENANCE != 0, stamp: u64_at(40) }
        };
        Ok(Frame {
            version,
            key_id: b[5],
            node_id: b[6],
            cluster: u64_at(8),
            boot: u64_at(16),
            seq: u64_at(28),
            health,
            maintenance,
            resources,
            control,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"a shared secret";

    pub(crate) fn sample() -> Frame {
        Frame {
            version: VERSION,
            key_id: 1,
            node_id: 0,
            cluster: cluster_id("nas-pair"),
            boot: 1_700_000_000_000_000,
            seq: 42,
            health: 100,
            maintenance: Maintenance { on: true, stamp: 1_800_000_000_000 },
            resources: vec![ResourceState { role: 1, disk: 3, conn: 1, generation: 0xdead_beef }],
            control: Some(Control::Released { id: 7, ok: false, reason: "busy ✓".into() }),
        }
    }

    fn control() -> impl Strategy<Value = Control> {
        let reason = "\\PC{0,40}";
        prop_oneof![
            (any::<u64>(), any::<u32>()).prop_map(|(id, mask)| Control::Outdate { id, mask }),
            (any::<u64>(), any::<u32>()).prop_map(|(id, mask)| Control::Outdated { id, mask }),
            any::<u64>().prop_map(|id| Control::Release { id }),
            (any::<u64>(), any::<bool>(), reason).prop_map(|(id, ok, reason)| Control::Released {
                id,
                ok,
                reason
            }),
            (any::<u64>(), any::<bool>()).prop_map(|(id, force)| Control::TakeOver { id, force }),
            (any::<u64>(), any::<bool>(), reason).prop_map(|(id, ok, reason)| Control::TookOver {
                id,
                ok,
                reason
            }),
        ]
    }

    fn resource() -> impl Strategy<Value = ResourceState> {
        (0u8..2, 0u8..5, 0u8..5, any::<u64>()).prop_map(|(role, disk, conn, generation)| {
            ResourceState { role, disk, conn, generation }
        })
    }

    proptest! {
        #[test]
        fn round_trip(key_id: u8, node_id: u8, cluster: u64, boot: u64, seq: u64, health in 0u8..=100,
                      on: bool, stamp: u64,
                      resources in proptest::collection::vec(resource(), 0..=MAX_RESOURCES),
                      control in proptest::option::of(control())) {
            let maintenance = Maintenance { on, stamp };
            let f = Frame { version: VERSION, key_id, node_id, cluster, boot, seq, health, maintenance, resources, control };
            let b = f.encode(KEY);
            // The same frame in version 1: no maintenance mode, no Diskless code.
            let old = Frame { version: 1, ..f.clone() }.encode(KEY);
            let d = Frame::decode(&old, KEY).expect("a version-1 frame decodes");
            prop_assert_eq!(d.version, 1);
            prop_assert_eq!(d.maintenance, Maintenance::default());
            prop_assert_eq!(d.encode(KEY), old.clone());
            for (a, b) in d.resources.iter().zip(&f.resources) {
                prop_assert_eq!(a.disk, if b.disk == 4 { 0 } else { b.disk });
            }
            prop_assert!(b.len() <= MAX_FRAME);
            prop_assert_eq!(Frame::announced_len(&b), Ok(b.len()));
            prop_assert_eq!(Frame::decode(&b, KEY), Ok(f));
            // Every proper prefix is incomplete, never invalid or accepted.
            for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, b.len() - 1] {
                prop_assert_eq!(Frame::decode(&b[..cut], KEY), Err(FrameError::Incomplete));
            }
        }

        #[test]
        fn any_flipped_bit_is_refused(bit in 0usize..(HEADER_LEN + RESOURCE_LEN + 40) * 8) {
            let b = sample().encode(KEY);
            let bit = bit % (b.len() * 8);
            let mut t = b.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Frame::decode(&t, KEY).is_err(), "bit {bit} flipped and accepted");
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = Frame::decode(&b, KEY);
            let _ = Frame::announced_len(&b);
        }
    }

    #[test]
    fn wrong_key_is_refused() {
        let b = sample().encode(KEY);
        assert_eq!(Frame::decode(&b, b"another secret"), Err(FrameError::Mac));
    }

    #[test]
    fn tampered_fields_are_refused_by_the_mac() {
        let good = sample().encode(KEY);
        // Role byte of the first resource: Primary → Secondary.
        let mut t = good.clone();
        t[HEADER_LEN] = 0;
        assert_eq!(Frame::decode(&t, KEY), Err(FrameError::Mac));
        // Sequence bumped to dodge the replay window.
        let mut t = good.clone();
        t[35] ^= 0x80;
        assert_eq!(Frame::decode(&t, KEY), Err(FrameError::Mac));
    }

    #[test]
    fn lengths_are_checked_before_the_mac() {
        let mut b = sample().encode(KEY);
        b[24..28].copy_from_slice(&(u32::MAX).to_be_bytes());
        assert_eq!(Frame::decode(&b, KEY), Err(FrameError::Length("frame length")));
        let mut b = sample().encode(KEY);
        b[37] = 200;
        assert_eq!(Frame::decode(&b, KEY), Err(FrameError::Length("resource count")));
        let mut b = sample().encode(KEY);
        b.push(0);
        assert_eq!(
            Frame::decode(&b, KEY),
            Err(FrameError::Length("trailing bytes after the frame"))
        );
        let mut b = sample().encode(KEY);
        b[0] = b'X';
        assert_eq!(Frame::decode(&b, KEY), Err(FrameError::Magic));
        let mut b = sample().encode(KEY);
        b[4] = 9;
        assert_eq!(Frame::decode(&b, KEY), Err(FrameError::Version(9)));
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let f = Frame {
            control: Some(Control::TookOver { id: 1, ok: false, reason: "é".repeat(300) }),
            ..sample()
        };
        let d = Frame::decode(&f.encode(KEY), KEY).expect("decodes");
        let Some(Control::TookOver { reason, .. }) = d.control else { panic!("control lost") };
        assert_eq!(reason.len(), MAX_REASON);
    }

    /// `b` with its MAC made right again, so a test reaches the checks behind the MAC.
    fn resigned(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len();
        let tag = mac(KEY, &b[..n - MAC_LEN]).finalize().into_bytes();
        b[n - MAC_LEN..].copy_from_slice(&tag);
        b
    }

    #[test]
    fn maintenance_rides_in_the_flags_and_unknown_flags_are_refused() {
        let on = sample().encode(KEY);
        assert_eq!(on[7], 1);
        let off = Frame { maintenance: Maintenance { on: false, stamp: 5 }, ..sample() };
        let b = off.encode(KEY);
        assert_eq!(b[7], 0);
        assert_eq!(
            Frame::decode(&b, KEY).unwrap().maintenance,
            Maintenance { on: false, stamp: 5 }
        );
        for flags in [2u8, 0x80, 0xff] {
            let mut t = on.clone();
            t[7] = flags;
            assert_eq!(Frame::decode(&resigned(t), KEY), Err(FrameError::Field("flags")));
        }
    }

    #[test]
    fn version_1_frames_are_read_and_written_and_others_refused_naming_the_range() {
        let f = Frame { version: 1, ..sample() };
        let b = f.encode(KEY);
        assert_eq!((b[4], b[7]), (1, 0));
        assert_eq!(b.len() + 8, sample().encode(KEY).len(), "no maintenance stamp");
        let d = Frame::decode(&b, KEY).unwrap();
        assert_eq!(d, Frame { maintenance: Maintenance::default(), ..f });
        // Version 1 has no flags and no Diskless code.
        let mut t = b.clone();
        t[7] = 1;
        assert_eq!(Frame::decode(&resigned(t), KEY), Err(FrameError::Field("reserved")));
        let mut t = b.clone();
        t[40 + 1] = 4;
        assert_eq!(Frame::decode(&resigned(t), KEY), Err(FrameError::Field("resource state")));
        for v in [0u8, 3, 9] {
            let mut t = sample().encode(KEY);
            t[4] = v;
            let e = Frame::decode(&resigned(t), KEY).unwrap_err();
            assert_eq!(e, FrameError::Version(v));
            assert_eq!(
                e.to_string(),
                format!("unsupported heartbeat version {v} (this build speaks 1 to 2)")
            );
        }
    }

    #[test]
    fn versions_start_with_every_one_and_settle_on_the_highest_both_speak() {
        // Two nodes of this release: both start sending 1 and 2 and settle on 2, whichever
        // frame each hears first.
        let (mut a, mut b) = (Versions::new(VERSION), Versions::new(VERSION));
        assert_eq!(a.to_send(), 1..=2);
        b.heard(10, 1);
        assert_eq!(b.to_send(), 1..=1, "heard only version 1 so far");
        a.heard(20, 1);
        a.heard(20, 2);
        assert_eq!(a.to_send(), 2..=2);
        b.heard(10, 2);
        assert_eq!(b.to_send(), 2..=2);
        b.heard(10, 1);
        assert_eq!(b.to_send(), 2..=2, "a late version-1 frame of the same boot changes nothing");
        // An old peer (version 1 only): this node speaks 1 to it.
        let mut c = Versions::new(VERSION);
        c.heard(5, 1);
        assert_eq!(c.to_send(), 1..=1);
        // It restarts upgraded (a newer boot, version 2): this node moves up.
        c.heard(6, 2);
        assert_eq!(c.to_send(), 2..=2);
        // Downgraded again (newer boot, version 1 only): back to 1; older boots are ignored.
        c.heard(7, 1);
        assert_eq!(c.to_send(), 1..=1);
        c.heard(6, 2);
        assert_eq!(c.to_send(), 1..=1);
        // A node held to version 1 never sends 2.
        let mut old = Versions::new(1);
        assert_eq!(old.to_send(), 1..=1);
        old.heard(1, 2);
        assert_eq!(old.to_send(), 1..=1);
    }

    #[test]
    fn the_last_maintenance_command_wins_whatever_the_clocks_say() {
        let m0 = Maintenance::default();
        let a = Maintenance::set(m0, true, 1_000);
        assert_eq!(a, Maintenance { stamp: 1_000, on: true });
        // A command on a node whose clock is behind still comes after what it knows.
        let b = Maintenance::set(a, false, 10);
        assert_eq!(b, Maintenance { stamp: 1_001, on: false });
        assert!(b > a);
        // A tie between the two modes resolves to on.
        let tie_on = Maintenance { stamp: 7, on: true };
        let tie_off = Maintenance { stamp: 7, on: false };
        assert_eq!(tie_on.max(tie_off), tie_on);
        assert_eq!(
            Maintenance::set(Maintenance { stamp: u64::MAX, on: true }, false, 0).stamp,
            u64::MAX
        );
    }

    /// The seeds of the `heartbeat_frames` fuzz target: frames of this version that the
    /// target's receiver (key "fuzz key", cluster "fuzz", peer node 1) accepts, each also as a
    /// serial stream.
    fn fuzz_seeds() -> Vec<(String, Vec<u8>)> {
        let key = b"fuzz key";
        let base = Frame {
            version: VERSION,
            key_id: 1,
            node_id: 1,
            cluster: cluster_id("fuzz"),
            boot: 7,
            seq: 1,
            health: 100,
            maintenance: Maintenance::default(),
            resources: vec![ResourceState { role: 1, disk: 3, conn: 1, generation: 0xabc }],
            control: None,
        };
        let frames = [
            ("alive", base.clone()),
            (
                "maintenance",
                Frame {
                    seq: 2,
                    maintenance: Maintenance { on: true, stamp: 1_800_000_000_000 },
                    ..base.clone()
                },
            ),
            (
                "outdate",
                Frame {
                    seq: 3,
                    resources: vec![ResourceState { role: 0, disk: 3, ..base.resources[0] }; 2],
                    control: Some(Control::Outdate { id: 5, mask: 0b11 }),
                    ..base.clone()
                },
            ),
            (
                "released",
                Frame {
                    seq: 4,
                    resources: vec![],
                    control: Some(Control::Released { id: 9, ok: true, reason: "done".into() }),
                    ..base.clone()
                },
            ),
            ("version1", Frame { version: 1, seq: 6, ..base.clone() }),
            (
                "takeover",
                Frame {
                    seq: 5,
                    health: 0,
                    resources: vec![ResourceState { disk: 4, conn: 0, ..base.resources[0] }],
                    control: Some(Control::TakeOver { id: 1, force: true }),
                    ..base
                },
            ),
        ];
        let mut out = Vec::new();
        for (name, f) in frames {
            let b = f.encode(key);
            assert_eq!(Frame::decode(&b, key), Ok(f), "{name}");
            out.push((format!("{name}.serial"), crate::serial::wrap(&b)));
            out.push((name.to_string(), b));
        }
        out
    }

    /// The committed seeds are current (`DUET_WRITE_SEEDS=1` rewrites them after a format
    /// change), so the fuzzer starts from frames that get past the version check.
    #[test]
    fn the_fuzz_seeds_are_frames_of_this_version() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/heartbeat_frames");
        let seeds = fuzz_seeds();
        if std::env::var_os("DUET_WRITE_SEEDS").is_some() {
            for e in std::fs::read_dir(&dir).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
            for (name, b) in &seeds {
                std::fs::write(dir.join(name), b).unwrap();
            }
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let mut want: Vec<String> = seeds.iter().map(|s| s.0.clone()).collect();
        want.sort();
        assert_eq!(
            on_disk, want,
            "rewrite with DUET_WRITE_SEEDS=1 cargo test -p heartbeat fuzz_seeds"
        );
        for (name, b) in &seeds {
            let have = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(
                &have, b,
                "{name} is stale: rewrite with DUET_WRITE_SEEDS=1 cargo test -p heartbeat fuzz_seeds"
            );
        }
    }

    #[test]
    fn cluster_ids_differ() {
        assert_ne!(cluster_id("nas-pair"), cluster_id("nas-pair2"));
        assert_eq!(cluster_id(""), 0xcbf2_9ce4_8422_2325);
    }
}
