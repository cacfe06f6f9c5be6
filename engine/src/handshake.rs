//! The peer handshake's messages and checks. Pure: the driver sends [`Hello`], answers with
//! [`auth_tag`], checks the peer's tag with [`verify_tag`], exchanges [`Params`] and asks
//! [`check_params`] whether the two sides may replicate at all.
//!
//! Authentication is mutual HMAC-SHA256 challenge/response over the cluster secret: each side
//! sends a fresh 32-byte challenge and proves it knows the secret by MAC-ing both challenges,
//! the cluster and resource names and both node names. A peer without the secret learns nothing
//! and gets no data; a recorded handshake cannot be replayed because the challenges are fresh.
//! Everything after the two tags travels sealed under keys derived from the same inputs
//! ([`crate::seal`]): the handshake authenticates the peer once, the seal every frame after.

use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::generation::Generations;
use crate::seal::Protection;
use crate::wire::{Cursor, Kind, MIN_VERSION, VERSION, WireError, put_string};

/// Hello feature: the sender exchanges [`ConfigKeys`] after the parameters. Additions that an
/// older build can simply go without travel as features (each side uses one only when both
/// Hellos carry it); changes it would misread raise the version.
pub const F_CONFIG_KEYS: u64 = 1;
/// Features this build understands (bit set).
pub const FEATURES: u64 = F_CONFIG_KEYS;
const AUTH_CONTEXT: &[u8] = b"duet-peer-auth-v2";

/// First frame in each direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub features: u64,
    pub cluster: String,
    pub node: String,
    pub resource: String,
    pub challenge: [u8; 32],
    /// [`Protection::code`]: whether the sender encrypts (`link_encryption`).
    pub protection: u8,
}

impl Hello {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.version);
        out.put_u64(self.features);
        put_string(out, &self.cluster);
        put_string(out, &self.node);
        put_string(out, &self.resource);
        out.put_slice(&self.challenge);
        out.put_u8(self.protection);
    }
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(Kind::Hello, b);
        let version = c.u32()?;
        let features = c.u64()?;
        let cluster = c.string(256)?;
        let node = c.string(256)?;
        let resource = c.string(256)?;
        let challenge = c.bytes(32)?.try_into().expect("32 bytes");
        let protection = c.u8()?;
        c.end()?;
        Ok(Self { version, features, cluster, node, resource, challenge, protection })
    }
}

/// Why a handshake was refused. The text goes to the log and to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "peer speaks replication protocol versions up to {peer}, this node {}: upgrade the older node (a rolling upgrade goes one release at a time)",
        range(*min, *max)
    )]
    Version { peer: u32, min: u32, max: u32 },
    #[error("peer belongs to cluster {0:?}, not ours; check [cluster] name on both nodes")]
    Cluster(String),
    #[error("peer is node {got:?}, expected {want:?}; check the replication_address of each node")]
    Node { got: String, want: String },
    #[error("peer offers resource {got:?} on this address, expected {want:?}")]
    Resource { got: String, want: String },
    #[error(
        "peer has link_encryption = {}, this node {}; set the same in [cluster] on both nodes",
        peer_encrypts(*.0), peer_encrypts(*.1)
    )]
    Protection(u8, u8),
    #[error(
        "peer failed authentication: wrong cluster secret (secret_file must be identical on both nodes)"
    )]
    Auth,
    #[error(
        "resource configuration differs between the nodes ({0}); use the same config file on both"
    )]
    Config(&'static str),
    #[error(
        "peer's volume is {peer} bytes but ours is {mine}: the node that receives the data needs at least the primary's size; grow its disk and run `duet create-md` there"
    )]
    Size { mine: u64, peer: u64 },
}

fn range(min: u32, max: u32) -> String {
    if min == max { format!("only {min}") } else { format!("{min} to {max}") }
}

/// The replication protocol versions a node speaks. Each Hello carries the sender's highest;
/// both sides then speak the lower of the two highest, which each must speak. A new version
/// that only adds (a frame kind, a flag the older side never sees unasked) keeps `min`; one an
/// older build would misread raises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub min: u32,
    pub max: u32,
}

impl Versions {
    /// What this build speaks.
    pub const THIS: Self = Self { min: MIN_VERSION, max: VERSION };

    /// The version of a session with a peer whose highest is `theirs`.
    pub fn agree(self, theirs: u32) -> Result<u32, Refusal> {
        let v = theirs.min(self.max);
        if v < self.min {
            return Err(Refusal::Version { peer: theirs, min: self.min, max: self.max });
        }
        Ok(v)
    }
}

fn peer_encrypts(code: u8) -> &'static str {
    match Protection::from_code(code) {
        Some(Protection::Encrypt) => "true",
        Some(Protection::Authenticate) => "false",
        None => "unknown",
    }
}

/// What one side's tag covers: the link's names, who proves, and both challenges.
#[derive(Debug, Clone, Copy)]
pub struct AuthInput<'a> {
    pub cluster: &'a str,
    pub resource: &'a str,
    /// The node that sends the tag, and its challenge.
    pub prover: &'a str,
    pub prover_challenge: &'a [u8; 32],
    /// The node that checks it, and its challenge.
    pub verifier: &'a str,
    pub verifier_challenge: &'a [u8; 32],
}

fn auth_mac(secret: &[u8], a: &AuthInput<'_>) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(AUTH_CONTEXT);
    for s in [a.cluster, a.resource, a.prover, a.verifier] {
        mac.update(&(s.len() as u64).to_be_bytes());
        mac.update(s.as_bytes());
    }
    mac.update(a.verifier_challenge);
    mac.update(a.prover_challenge);
    mac
}

/// The tag a node sends to prove it knows `secret`.
pub fn auth_tag(secret: &[u8], a: &AuthInput<'_>) -> [u8; 32] {
    auth_mac(secret, a).finalize().into_bytes().into()
}

/// Checks the peer's tag in constant time.
pub fn verify_tag(secret: &[u8], a: &AuthInput<'_>, tag: &[u8]) -> Result<(), Refusal> {
    auth_mac(secret, a).verify_slice(tag).map_err(|_| Refusal::Auth)
}

/// Checks the peer's Hello against what we expect (`protection`: ours). The version is
/// [`Versions::agree`]'s.
pub fn check_hello(
    h: &Hello,
    cluster: &str,
    peer_node: &str,
    resource: &str,
    protection: Protection,
) -> Result<(), Refusal> {
    if h.cluster != cluster {
        return Err(Refusal::Cluster(h.cluster.clone()));
    }
    if h.node != peer_node {
        return Err(Refusal::Node { got: h.node.clone(), want: peer_node.into() });
    }
    if h.resource != resource {
        return Err(Refusal::Resource { got: h.resource.clone(), want: resource.into() });
    }
    if h.protection != protection.code() {
        return Err(Refusal::Protection(h.protection, protection.code()));
    }
    Ok(())
}

/// Appends generations (current, bitmap, history) in wire order.
pub fn put_generations(out: &mut BytesMut, g: &Generations) {
    for v in [g.current, g.bitmap, g.history[0], g.history[1]] {
        out.put_u64(v);
    }
}

/// Reads generations written by [`put_generations`].
pub fn get_generations(c: &mut Cursor<'_>) -> Result<Generations, WireError> {
    Ok(Generations { current: c.u64()?, bitmap: c.u64()?, history: [c.u64()?, c.u64()?] })
}

/// Params flag: the sender is Primary.
pub const P_PRIMARY: u32 = 1;
/// Params flag: the sender crashed while Primary.
pub const P_CRASHED_PRIMARY: u32 = 1 << 1;
/// Params flag: the sender's operator asked to discard its data (manual split-brain recovery).
pub const P_DISCARD_MY_DATA: u32 = 1 << 2;
/// Params flag: the sender's disk is Inconsistent.
pub const P_INCONSISTENT: u32 = 1 << 3;
/// Params flag: the sender's disk is Outdated.
pub const P_OUTDATED: u32 = 1 << 4;

/// What each side tells the other after authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Size of the replicated data area.
    pub size: u64,
    /// Hash of the settings that must match (protocol, granularity, integrity…).
    pub fingerprint: u64,
    pub uuids: Generations,
    /// `P_*` bits.
    pub flags: u32,
    /// Bits set in the sender's out-of-sync bitmap ("changes", for discard-least-changes).
    pub bitmap_weight: u64,
}

impl Params {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.size);
        out.put_u64(self.fingerprint);
        put_generations(out, &self.uuids);
        out.put_u32(self.flags);
        out.put_u64(self.bitmap_weight);
    }
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(Kind::Params, b);
        let size = c.u64()?;
        let fingerprint = c.u64()?;
        let uuids = get_generations(&mut c)?;
        let flags = c.u32()?;
        let bitmap_weight = c.u64()?;
        c.end()?;
        if size == 0 {
            return Err(WireError::Payload(Kind::Params, "zero volume size"));
        }
        Ok(Self { size, fingerprint, uuids, flags, bitmap_weight })
    }
    pub fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }
}

/// Whether two sides may replicate: same settings, and a peer that could receive our data is at
/// least as large (checked by the side that is Primary, or by both when neither is).
pub fn check_params(mine: &Params, peer: &Params) -> Result<(), Refusal> {
    if mine.fingerprint != peer.fingerprint {
        return Err(Refusal::Config("protocol, bitmap granularity or data_integrity"));
    }
    let primary_me = mine.has(P_PRIMARY);
    let primary_peer = peer.has(P_PRIMARY);
    if primary_me && peer.size < mine.size {
        return Err(Refusal::Size { mine: mine.size, peer: peer.size });
    }
    if primary_peer && mine.size < peer.size {
        return Err(Refusal::Size { mine: mine.size, peer: peer.size });
    }
    if !primary_me && !primary_peer && mine.size != peer.size {
        return Err(Refusal::Size { mine: mine.size, peer: peer.size });
    }
    Ok(())
}

/// A node's configuration as its keys (`cluster.failback`) with a hash of each value, so the
/// two nodes can name the keys in which their files differ without sending the values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigKeys(pub Vec<(String, u64)>);

impl ConfigKeys {
    /// Most keys sent (a file has a few dozen); with [`Self::MAX_KEY`], the frame fits the
    /// handshake's 64 KiB.
    pub const MAX: usize = 512;
    /// Longest key path, in bytes (a longer one is cut at a character boundary).
    pub const MAX_KEY: usize = 96;

    pub fn encode(&self, out: &mut BytesMut) {
        let n = self.0.len().min(Self::MAX);
        out.put_u16(u16::try_from(n).expect("bounded"));
        for (k, h) in self.0.iter().take(n) {
            let mut end = k.len().min(Self::MAX_KEY);
            while !k.is_char_boundary(end) {
                end -= 1;
            }
            put_string(out, &k[..end]);
            out.put_u64(*h);
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(Kind::ConfigKeys, b);
        let n = usize::from(c.u16()?);
        if n > Self::MAX {
            return Err(WireError::Payload(Kind::ConfigKeys, "too many keys"));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push((c.string(Self::MAX_KEY)?, c.u64()?));
        }
        c.end()?;
        Ok(Self(v))
    }

    /// The keys whose values differ, then those only one side sets (`"x (only here)"`,
    /// `"y (only on the peer)"`), each once, sorted.
    pub fn differences(&self, theirs: &Self) -> Vec<String> {
        use std::collections::BTreeMap;
        let mine: BTreeMap<&str, u64> = self.0.iter().map(|(k, h)| (k.as_str(), *h)).collect();
        let peer: BTreeMap<&str, u64> = theirs.0.iter().map(|(k, h)| (k.as_str(), *h)).collect();
        let mut out: Vec<String> = mine
            .iter()
            .filter(|(k, h)| peer.get(*k).is_some_and(|p| p != *h))
            .map(|(k, _)| (*k).to_string())
            .collect();
        out.extend(
            mine.keys().filter(|k| !peer.contains_key(*k)).map(|k| format!("{k} (only here)")),
        );
        out.extend(
            peer.keys()
                .filter(|k| !mine.contains_key(*k))
                .map(|k| format!("{k} (only on the peer)")),
        );
        out
    }
}

/// The fingerprint of the settings both nodes must share (FNV-1a over a canonical text).
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            features: FEATURES,
            cluster: "c".into(),
            node: "alpha".into(),
            resource: "vol0".into(),
            challenge: [7; 32],
            protection: Protection::Encrypt.code(),
        }
    }

    #[test]
    fn hello_round_trip_and_checks() {
        let h = hello();
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(Hello::decode(&b).unwrap(), h);
        for n in 0..b.len() {
            assert!(Hello::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let e = Protection::Encrypt;
        check_hello(&h, "c", "alpha", "vol0", e).unwrap();
        assert!(matches!(check_hello(&h, "d", "alpha", "vol0", e), Err(Refusal::Cluster(_))));
        assert!(matches!(check_hello(&h, "c", "beta", "vol0", e), Err(Refusal::Node { .. })));
        assert!(matches!(check_hello(&h, "c", "alpha", "vol1", e), Err(Refusal::Resource { .. })));
        let plain = check_hello(&h, "c", "alpha", "vol0", Protection::Authenticate).unwrap_err();
        assert_eq!(
            plain.to_string(),
            "peer has link_encryption = true, this node false; set the same in [cluster] on both nodes"
        );
    }

    #[test]
    fn config_keys_round_trip_refuse_garbage_and_name_what_differs() {
        let a = ConfigKeys(vec![
            ("cluster.failback".into(), 1),
            ("heartbeat.deadtime_ms".into(), 2),
            ("resource[0].resync.rate_kib".into(), 3),
            ("hooks.split_brain".into(), 4),
        ]);
        let mut b = BytesMut::new();
        a.encode(&mut b);
        assert_eq!(ConfigKeys::decode(&b).unwrap(), a);
        for n in 0..b.len() {
            assert!(ConfigKeys::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b.clone();
        long.put_u8(0);
        assert!(ConfigKeys::decode(&long).is_err(), "trailing byte");
        assert!(ConfigKeys::decode(&[0xff, 0xff]).is_err(), "too many keys");
        let peer = ConfigKeys(vec![
            ("cluster.failback".into(), 9),
            ("heartbeat.deadtime_ms".into(), 2),
            ("resource[0].resync.rate_kib".into(), 3),
            ("vip[0].address".into(), 5),
        ]);
        assert_eq!(
            a.differences(&peer),
            [
                "cluster.failback",
                "hooks.split_brain (only here)",
                "vip[0].address (only on the peer)"
            ]
        );
        assert!(a.differences(&a).is_empty());
        // Too many keys to send: the first MAX go, and they decode.
        let many = ConfigKeys((0..ConfigKeys::MAX + 5).map(|i| (format!("k{i}"), 0)).collect());
        let mut b = BytesMut::new();
        many.encode(&mut b);
        assert_eq!(ConfigKeys::decode(&b).unwrap().0.len(), ConfigKeys::MAX);
        // The largest frame fits the handshake's limit; a long key is cut, never split inside
        // a character.
        let big = ConfigKeys(
            (0..ConfigKeys::MAX).map(|i| (format!("{i}{}", "é".repeat(60)), 0)).collect(),
        );
        let mut b = BytesMut::new();
        big.encode(&mut b);
        assert!(b.len() + 64 <= 64 * 1024, "{}", b.len());
        let back = ConfigKeys::decode(&b).unwrap();
        assert!(back.0.iter().all(|(k, _)| k.len() <= ConfigKeys::MAX_KEY && k.ends_with('é')));
    }

    #[test]
    fn versions_agree_on_the_lower_highest_that_both_speak() {
        let this = Versions { min: 2, max: 3 };
        // A peer of the same range, an older one within ours, a newer one that speaks down.
        assert_eq!(this.agree(3), Ok(3));
        assert_eq!(this.agree(2), Ok(2));
        assert_eq!(this.agree(9), Ok(3));
        let e = this.agree(1).unwrap_err();
        assert_eq!(e, Refusal::Version { peer: 1, min: 2, max: 3 });
        assert_eq!(
            e.to_string(),
            "peer speaks replication protocol versions up to 1, this node 2 to 3: upgrade the older node (a rolling upgrade goes one release at a time)"
        );
        // Both sides reach the same version, or one of them refuses.
        for (a, b) in [((2, 3), (3, 4)), ((1, 2), (2, 2)), ((2, 2), (3, 3)), ((1, 4), (2, 3))] {
            let (a, b) = (Versions { min: a.0, max: a.1 }, Versions { min: b.0, max: b.1 });
            match (a.agree(b.max), b.agree(a.max)) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "{a:?} {b:?}"),
                (x, y) => assert!(x.is_err() || y.is_err(), "{a:?} {b:?}"),
            }
        }
        assert!(
            Versions { min: 3, max: 3 }
                .agree(2)
                .unwrap_err()
                .to_string()
                .contains("this node only 3")
        );
        const { assert!(Versions::THIS.min <= Versions::THIS.max) };
    }

    #[test]
    fn auth_is_mutual_and_bound_to_everything() {
        let (ca, cb) = ([1u8; 32], [2u8; 32]);
        // alpha proves itself to beta.
        let a = AuthInput {
            cluster: "c",
            resource: "vol0",
            prover: "alpha",
            prover_challenge: &ca,
            verifier: "beta",
            verifier_challenge: &cb,
        };
        let tag = auth_tag(b"s3cret", &a);
        verify_tag(b"s3cret", &a, &tag).unwrap();
        assert_eq!(verify_tag(b"wrong", &a, &tag), Err(Refusal::Auth));
        assert_eq!(verify_tag(b"s3cret", &a, &tag[..31]), Err(Refusal::Auth));
        for other in [
            AuthInput { cluster: "x", ..a },
            AuthInput { resource: "vol1", ..a },
            AuthInput { prover: "alphx", ..a },
            AuthInput { verifier: "betx", ..a },
            AuthInput { prover_challenge: &cb, ..a },
            AuthInput { verifier_challenge: &ca, ..a },
            // A reflected tag (beta's own side of the exchange) does not pass.
            AuthInput {
                prover: "beta",
                verifier: "alpha",
                prover_challenge: &cb,
                verifier_challenge: &ca,
                ..a
            },
        ] {
            assert_eq!(verify_tag(b"s3cret", &other, &tag), Err(Refusal::Auth), "{other:?}");
        }
    }

    fn params(size: u64, flags: u32) -> Params {
        Params {
            size,
            fingerprint: 9,
            uuids: Generations { current: 10, bitmap: 0, history: [0, 0] },
            flags,
            bitmap_weight: 3,
        }
    }

    proptest! {
        #[test]
        fn params_round_trip(size in 1u64.., fp: u64, c: u64, b: u64, h0: u64, h1: u64, flags: u32, w: u64) {
            let p = Params { size, fingerprint: fp, uuids: Generations { current: c, bitmap: b, history: [h0, h1] }, flags, bitmap_weight: w };
            let mut out = BytesMut::new();
            p.encode(&mut out);
            prop_assert_eq!(Params::decode(&out).unwrap(), p);
            prop_assert!(Params::decode(&out[..out.len() - 1]).is_err());
            out.put_u8(0);
            prop_assert!(Params::decode(&out).is_err());
        }
    }

    #[test]
    fn size_rules() {
        let big = params(2 << 30, 0);
        let small = params(1 << 30, 0);
        check_params(&big, &big).unwrap();
        // Both Secondary: must match.
        assert!(matches!(check_params(&big, &small), Err(Refusal::Size { .. })));
        // A Primary may replicate to a larger peer, never to a smaller one.
        check_params(&params(1 << 30, P_PRIMARY), &big).unwrap();
        check_params(&big, &params(1 << 30, P_PRIMARY)).unwrap();
        assert!(check_params(&params(2 << 30, P_PRIMARY), &small).is_err());
        assert!(check_params(&small, &params(2 << 30, P_PRIMARY)).is_err());
        let other = Params { fingerprint: 8, ..big };
        assert!(matches!(check_params(&big, &other), Err(Refusal::Config(_))));
        assert_eq!(
            Params::decode(&[0; 60]),
            Err(WireError::Payload(Kind::Params, "zero volume size"))
        );
    }

    #[test]
    fn fingerprint_separates_fields() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
        assert_eq!(fingerprint(&["C", "4096"]), fingerprint(&["C", "4096"]));
    }
}
