//! The node's event log: typed events (a sequence number, the time, the kind, the resource,
//! old → new, the reason), kept in a bounded file in `state_dir` (`NODE.events`, one JSON object
//! per line) so they survive a restart, and pushed to followers (`duet events --follow`) as they
//! happen.
//!
//! Two sources feed it: what the cluster manager and the replicator say ([`Kind::Message`], the
//! lines `duet events` always showed), and the changes of state the daemon sees ([`diff`] of two
//! [`Snap`]s: roles, disk and connection states, the running role, the peer, links, VIPs,
//! services, split brain, verify findings). A follower first gets the current state as
//! `exists` records, then every change, as `drbdsetup events2` does.

use std::collections::VecDeque;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::state::StateError;
use crate::status::NodeStatus;

/// Events kept (in memory and, after the next rewrite, on disk).
pub const KEPT: usize = 2000;
/// Events a follower may fall behind by before it is cut off (and told so).
pub const FOLLOW_BACKLOG: usize = 1024;
/// The longest events file read at start (a longer one is read from its tail).
const MAX_FILE: u64 = 16 << 20;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A resource's role on this node (Primary | Secondary).
    Role,
    /// This node's disk state.
    Disk,
    /// The replication connection's state.
    Connection,
    /// The peer's disk state as the replication link reports it.
    PeerDisk,
    /// Split brain detected (`new`: why) or resolved.
    SplitBrain,
    /// An online verify finished and found blocks that differ (`new`: bytes).
    OutOfSync,
    /// The split brain discards this Primary's data under `call-pri-lost-after-sb` (`reason`:
    /// the split brain's).
    PriLostAfterSb,
    /// The local disk failed (`name`: the disk; `new`: detached | passed to the client...;
    /// `reason`: what failed, where, and the error).
    IoError,
    /// This node's running role (master | slave | partly master).
    RunningRole,
    /// The peer as the heartbeat sees it (alive | dead | unknown).
    Peer,
    /// A heartbeat link's state (`name`: the link).
    Link,
    /// This node's health checks (healthy | failing).
    Health,
    /// The cluster's maintenance mode (on | off).
    Maintenance,
    /// Who holds a VIP (`name`: its address).
    Vip,
    /// A service's state here (`name`: the service).
    Service,
    /// A line of the cluster manager's or the replicator's log (`reason`).
    Message,
}

/// Whether a record is part of the state a follower starts from, or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Record {
    /// The state when the follower connected (`seq`: the last event's then).
    Exists,
    #[default]
    Change,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing across restarts.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub at: f64,
    #[serde(rename = "type", default)]
    pub record: Record,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// What within the node: a link, a VIP, a service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Event {
    /// The line `duet events` prints (after the time).
    pub fn line(&self) -> String {
        let mut s = String::new();
        if let Some(r) = &self.resource {
            s.push_str(r);
            s.push_str(": ");
        }
        if self.kind == Kind::Message {
            s.push_str(&self.reason);
            return s;
        }
        let kind = serde_json::to_value(self.kind).ok();
        s.push_str(kind.as_ref().and_then(|k| k.as_str()).unwrap_or("?"));
        if let Some(n) = &self.name {
            s.push(' ');
            s.push_str(n);
        }
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => s.push_str(&format!(" {o} -> {n}")),
            (None, Some(n)) => s.push_str(&format!(" {n}")),
            (Some(o), None) => s.push_str(&format!(" {o} -> (none)")),
            (None, None) => {}
        }
        if !self.reason.is_empty() {
            s.push_str(&format!(" ({})", self.reason));
        }
        s
    }
}

/// An event before it is numbered: what [`diff`] finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub resource: Option<String>,
    pub name: Option<String>,
    pub old: Option<String>,
    pub new: Option<String>,
    pub reason: String,
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

struct Inner {
    seq: u64,
    ring: VecDeque<Event>,
    /// Lines to the writer thread (None: in memory only, or closed).
    writer: Option<std::sync::mpsc::Sender<String>>,
}

/// The event log: numbered, bounded, on disk, pushed to followers.
pub struct Journal {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Lines of the file that could not be read at start (a torn last line after a crash).
    pub damaged: usize,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("damaged", &self.damaged).finish_non_exhaustive()
    }
}

impl Default for Journal {
    fn default() -> Self {
        Self::in_memory()
    }
}

/// The events of a file's text, oldest first, and how many lines were not events.
pub fn parse(text: &str) -> (Vec<Event>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Event>(l) {
            // Out of order (a file put together by hand): dropped, the sequence stays increasing.
            Ok(e) if out.last().is_none_or(|p: &Event| p.seq < e.seq) => out.push(e),
            _ => bad += 1,
        }
    }
    (out, bad)
}

impl Journal {
    /// A log that keeps nothing on disk (tests, and a node without a state directory).
    pub fn in_memory() -> Self {
        Self {
            inner: Mutex::new(Inner { seq: 0, ring: VecDeque::new(), writer: None }),
            tx: broadcast::channel(FOLLOW_BACKLOG).0,
            thread: Mutex::new(None),
            damaged: 0,
        }
    }

    /// The path of `node`'s events file in `dir`.
    pub fn path(dir: &Path, node: &str) -> PathBuf {
        dir.join(format!("{node}.events"))
    }

    /// Opens `node`'s log in `dir`: the events kept there are read back (lines that are not
    /// events are skipped and counted), and new ones are appended by a writer thread that
    /// fdatasyncs after each batch and rewrites the file atomically when it grows past twice
    /// [`KEPT`].
    pub fn open(dir: &Path, node: &str) -> Result<Self, StateError> {
        crate::state::ensure_dir(dir)?;
        let path = Self::path(dir, node);
        let text = read_tail(&path)?;
        let (events, damaged) = parse(&text);
        let kept: VecDeque<Event> =
            events.into_iter().rev().take(KEPT).collect::<Vec<_>>().into_iter().rev().collect();
        let seq = kept.back().map_or(0, |e| e.seq);
        // Start from a clean file of what is kept (drops damaged lines and an over-long tail).
        let mut body = String::new();
        for e in &kept {
            body.push_str(&serde_json::to_string(e).unwrap_or_default());
            body.push('\n');
        }
        crate::state::write_atomic(&path, body.as_bytes())?;
        let lines: VecDeque<String> = body.lines().map(str::to_string).collect();
        let (wtx, wrx) = std::sync::mpsc::channel::<String>();
        let thread = std::thread::Builder::new()
            .name("duet-events".into())
            .spawn(move || writer(&path, lines, &wrx))
            .map_err(|source| StateError::Write { path: Self::path(dir, node), source })?;
        Ok(Self {
            inner: Mutex::new(Inner { seq, ring: kept, writer: Some(wtx) }),
            tx: broadcast::channel(FOLLOW_BACKLOG).0,
            thread: Mutex::new(Some(thread)),
            damaged,
        })
    }

    /// Numbers, keeps, writes and pushes one change.
    pub fn record(&self, c: Change) -> Event {
        let mut g = self.inner.lock().expect("journal poisoned");
        g.seq += 1;
        let e = Event {
            seq: g.seq,
            at: unix_now(),
            record: Record::Change,
            kind: c.kind,
            resource: c.resource,
            name: c.name,
            old: c.old,
            new: c.new,
            reason: c.reason,
        };
        g.ring.push_back(e.clone());
        while g.ring.len() > KEPT {
            g.ring.pop_front();
        }
        if let Some(w) = &g.writer {
            let _ = w.send(serde_json::to_string(&e).unwrap_or_default());
        }
        // Sent under the lock: a follower subscribing sees each event once, in order.
        let _ = self.tx.send(e.clone());
        e
    }

    /// A log line of the cluster manager's (no resource).
    pub fn push(&self, what: String) {
        self.message(None, what);
    }

    /// A log line, of a resource or of the node.
    pub fn message(&self, resource: Option<&str>, what: String) {
        self.record(Change {
            kind: Kind::Message,
            resource: resource.map(str::to_string),
            name: None,
            old: None,
            new: None,
            reason: what,
        });
    }

    /// Events after `seq`, oldest first.
    pub fn since_seq(&self, seq: u64) -> Vec<Event> {
        let g = self.inner.lock().expect("journal poisoned");
        g.ring.iter().filter(|e| e.seq > seq).cloned().collect()
    }

    /// The last `n` events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        let g = self.inner.lock().expect("journal poisoned");
        g.ring.iter().skip(g.ring.len().saturating_sub(n)).cloned().collect()
    }

    /// Events after a time (seconds since the Unix epoch), oldest first.
    pub fn since(&self, at: f64) -> Vec<Event> {
        let g = self.inner.lock().expect("journal poisoned");
        g.ring.iter().filter(|e| e.at > at).cloned().collect()
    }

    /// The last event's number.
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().expect("journal poisoned").seq
    }

    /// Subscribes to new events; returns the last number at that moment (every event after it
    /// comes through the receiver, none before it).
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Event>) {
        let g = self.inner.lock().expect("journal poisoned");
        (g.seq, self.tx.subscribe())
    }

    /// Writes out what is queued and stops the writer (at the daemon's stop).
    pub fn close(&self) {
        self.inner.lock().expect("journal poisoned").writer = None;
        if let Some(t) = self.thread.lock().expect("journal poisoned").take() {
            let _ = t.join();
        }
    }
}

/// The file's text, or its last [`MAX_FILE`] bytes (from the first whole line) when longer;
/// empty when there is none. A symbolic link is refused.
fn read_tail(path: &Path) -> Result<String, StateError> {
    use std::io::{Read as _, Seek as _};
    let err = |source| StateError::Read { path: path.to_owned(), source };
    let mut f =
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(err(e)),
        };
    let len = f.metadata().map_err(err)?.len();
    let from = len.saturating_sub(MAX_FILE);
    f.seek(std::io::SeekFrom::Start(from)).map_err(err)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(err)?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if from > 0
        && let Some(nl) = text.find('\n')
    {
        text.drain(..=nl);
    }
    Ok(text)
}

/// The writer thread: appends each line, fdatasyncs after each batch, and rewrites the file
/// with the last [`KEPT`] lines when it holds twice as many. Errors are logged (rate-limited)
/// and the events stay in memory.
fn writer(path: &Path, mut lines: VecDeque<String>, rx: &std::sync::mpsc::Receiver<String>) {
    let limit = replicator::ratelimit::Limited::new(1, std::time::Duration::from_secs(60));
    let open =
        || std::fs::OpenOptions::new().append(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut file = open();
    let mut in_file = lines.len();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut text = String::new();
        for l in batch {
            text.push_str(&l);
            text.push('\n');
            lines.push_back(l);
            in_file += 1;
        }
        while lines.len() > KEPT {
            lines.pop_front();
        }
        let r = if in_file > 2 * KEPT {
            let mut body = lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n");
            body.push('\n');
            in_file = lines.len();
            let r = crate::state::write_atomic(path, body.as_bytes()).map_err(|e| e.to_string());
            file = open();
            r
        } else {
            match &mut file {
                Ok(f) => f
                    .write_all(text.as_bytes())
                    .and_then(|()| f.sync_data())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Err(e) = r
            && let Some(held) = limit.allow()
        {
            tracing::error!(
                suppressed = held,
                "cannot write the events file {}: {e}",
                path.display()
            );
            file = open();
        }
    }
}

/// The states events are made of, as read from one [`NodeStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snap {
    pub resources: Vec<ResSnap>,
    pub cluster: Option<ClusterSnap>,
}

/// One resource's states.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResSnap {
    pub name: String,
    pub role: String,
    pub disk: String,
    pub connection: String,
    pub peer_disk: Option<String>,
    pub split_brain: Option<String>,
    pub verifying: bool,
    pub verify_mismatched_bytes: u64,
    pub pri_lost: bool,
    /// The failed disk, the action taken, what failed.
    pub disk_failure: Option<(String, String, String)>,
}

/// The cluster manager's states.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterSnap {
    pub running_role: String,
    pub peer: String,
    pub healthy: bool,
    pub maintenance: bool,
    pub links: Vec<(String, String)>,
    pub vips: Vec<(String, Option<String>)>,
    pub services: Vec<(String, String)>,
}

/// What events are made of in `s`.
pub fn snap(s: &NodeStatus) -> Snap {
    Snap {
        resources: s
            .resources
            .iter()
            .map(|r| {
                let x = r.replication.as_ref();
                ResSnap {
                    name: r.name.clone(),
                    role: r.role.clone(),
                    disk: r.disk_state.clone(),
                    connection: r.connection.clone(),
                    peer_disk: x.and_then(|x| x.peer_disk).map(|d| format!("{d:?}")),
                    split_brain: x.and_then(|x| x.split_brain.clone()),
                    verifying: x.is_some_and(|x| x.verify.is_some()),
                    verify_mismatched_bytes: x
                        .map_or(0, |x| x.verify_mismatches.iter().map(|m| m.1).sum()),
                    pri_lost: x.is_some_and(|x| x.pri_lost_after_sb),
                    disk_failure: x.and_then(|x| x.disk_failure.as_ref()).map(|f| {
                        let what = format!("{} at {} failed: {}", f.op, f.offset, f.error);
                        (f.disk.clone(), f.action.clone(), what)
                    }),
                }
            })
            .collect(),
        // Not until the cluster manager has published its first state.
        cluster: s.ha.as_ref().filter(|h| !h.running_role.is_empty()).map(|h| ClusterSnap {
            running_role: h.running_role.clone(),
            peer: h.peer.clone(),
            healthy: h.healthy,
            maintenance: h.maintenance,
            links: h.links.iter().map(|l| (l.name.clone(), l.state.clone())).collect(),
            vips: h
                .vips
                .iter()
                .map(|v| (v.addresses.first().cloned().unwrap_or_default(), v.holder.clone()))
                .collect(),
            services: h.services.iter().map(|x| (x.name.clone(), x.state.clone())).collect(),
        }),
    }
}

/// The changes from `old` to `new`; from nothing (`None`), every state as it is.
pub fn diff(old: Option<&Snap>, new: &Snap) -> Vec<Change> {
    let mut out = Vec::new();
    // The cluster manager's first published state counts as a start too.
    let cluster_first = old.and_then(|o| o.cluster.as_ref()).is_none();
    let mut put = |kind,
                   resource: Option<&str>,
                   name: Option<&str>,
                   o: Option<&str>,
                   n: Option<&str>,
                   reason: &str| {
        let first = old.is_none() || (resource.is_none() && cluster_first);
        if first || o != n {
            out.push(Change {
                kind,
                resource: resource.map(str::to_string),
                name: name.map(str::to_string),
                old: if first { None } else { o.map(str::to_string) },
                new: n.map(str::to_string),
                reason: reason.to_string(),
            });
        }
    };
    let none = ResSnap::default();
    for r in &new.resources {
        let p = old.and_then(|o| o.resources.iter().find(|x| x.name == r.name)).unwrap_or(&none);
        let res = Some(r.name.as_str());
        put(Kind::Role, res, None, Some(&p.role), Some(&r.role), "");
        put(Kind::Disk, res, None, Some(&p.disk), Some(&r.disk), "");
        put(Kind::Connection, res, None, Some(&p.connection), Some(&r.connection), "");
        if old.is_none() || p.peer_disk != r.peer_disk {
            put(Kind::PeerDisk, res, None, p.peer_disk.as_deref(), r.peer_disk.as_deref(), "");
        }
        if p.split_brain.is_none() != r.split_brain.is_none()
            || (old.is_none() && r.split_brain.is_some())
        {
            let (o, n) =
                (p.split_brain.as_ref().map(|_| "yes"), r.split_brain.as_ref().map(|_| "yes"));
            let why = r.split_brain.as_deref().unwrap_or("resolved");
            put(Kind::SplitBrain, res, None, o.or(Some("no")), n.or(Some("no")), why);
        }
        if r.pri_lost && (old.is_none() || !p.pri_lost) {
            let why = r.split_brain.as_deref().unwrap_or("");
            put(Kind::PriLostAfterSb, res, None, None, Some("yes"), why);
        }
        if let Some((disk, action, what)) = &r.disk_failure
            && (old.is_none() || p.disk_failure.as_ref().map(|f| &f.1) != Some(action))
        {
            put(Kind::IoError, res, Some(disk), None, Some(action), what);
        }
        if old.is_some() && p.verifying && !r.verifying && r.verify_mismatched_bytes > 0 {
            let n = r.verify_mismatched_bytes.to_string();
            put(
                Kind::OutOfSync,
                res,
                None,
                None,
                Some(&n),
                "online verify found blocks that differ (bytes)",
            );
        }
    }
    if let Some(c) = &new.cluster {
        let none = ClusterSnap::default();
        let p = old.and_then(|o| o.cluster.as_ref()).unwrap_or(&none);
        put(Kind::RunningRole, None, None, Some(&p.running_role), Some(&c.running_role), "");
        put(Kind::Peer, None, None, Some(&p.peer), Some(&c.peer), "");
        let h = |b: bool| if b { "healthy" } else { "failing" };
        if old.is_none() || p.healthy != c.healthy || p.running_role.is_empty() {
            put(Kind::Health, None, None, Some(h(p.healthy)), Some(h(c.healthy)), "");
        }
        let m = |b: bool| if b { "on" } else { "off" };
        if old.is_none() || p.maintenance != c.maintenance || p.running_role.is_empty() {
            put(Kind::Maintenance, None, None, Some(m(p.maintenance)), Some(m(c.maintenance)), "");
        }
        for (name, state) in &c.links {
            let o = p.links.iter().find(|l| l.0 == *name).map(|l| l.1.as_str());
            put(Kind::Link, None, Some(name), o, Some(state), "");
        }
        for (addr, holder) in &c.vips {
            let o =
                p.vips.iter().find(|v| v.0 == *addr).map(|v| v.1.as_deref().unwrap_or("nobody"));
            put(Kind::Vip, None, Some(addr), o, Some(holder.as_deref().unwrap_or("nobody")), "");
        }
        for (name, state) in &c.services {
            let o = p.services.iter().find(|v| v.0 == *name).map(|v| v.1.as_str());
            put(Kind::Service, None, Some(name), o, Some(state), "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::fixture;

    fn kinds(c: &[Change]) -> Vec<(Kind, Option<&str>, Option<&str>)> {
        c.iter().map(|c| (c.kind, c.old.as_deref(), c.new.as_deref())).collect()
    }

    #[test]
    fn from_nothing_every_state_is_listed_and_then_only_changes() {
        let s = snap(&fixture());
        let all = diff(None, &s);
        let k = kinds(&all);
        assert!(k.contains(&(Kind::Role, None, Some("Primary"))), "{k:?}");
        assert!(k.contains(&(Kind::RunningRole, None, Some("master"))), "{k:?}");
        assert_eq!(all.iter().filter(|c| c.kind == Kind::Link).count(), 2);
        assert!(k.contains(&(Kind::Vip, None, Some("alpha"))), "{k:?}");
        assert!(diff(Some(&s), &s).is_empty(), "no change, no event");

        let mut f = fixture();
        f.resources[0].role = "Secondary".into();
        f.resources[0].connection = "SyncTarget".into();
        let h = f.ha.as_mut().unwrap();
        h.running_role = "slave".into();
        h.peer = "dead".into();
        h.links[1].state = "down".into();
        h.vips[0].holder = None;
        h.maintenance = true;
        let c = diff(Some(&s), &snap(&f));
        assert_eq!(
            kinds(&c),
            vec![
                (Kind::Role, Some("Primary"), Some("Secondary")),
                (Kind::Connection, Some("Connected"), Some("SyncTarget")),
                (Kind::RunningRole, Some("master"), Some("slave")),
                (Kind::Peer, Some("alive"), Some("dead")),
                (Kind::Maintenance, Some("off"), Some("on")),
                (Kind::Link, Some("up"), Some("down")),
                (Kind::Vip, Some("alpha"), Some("nobody")),
            ]
        );
        assert_eq!(c[5].name.as_deref(), Some("serial /dev/ttyS0"));
        assert_eq!(c[0].resource.as_deref(), Some("vol0"));
    }

    #[test]
    fn split_brain_and_verify_findings_are_events_with_their_reason() {
        let before = snap(&fixture());
        let mut f = fixture();
        f.resources[0].replication.as_mut().unwrap().split_brain = Some("both wrote".into());
        let c = diff(Some(&before), &snap(&f));
        assert_eq!(kinds(&c), vec![(Kind::SplitBrain, Some("no"), Some("yes"))]);
        assert_eq!(c[0].reason, "both wrote");
        let mut verifying = before.clone();
        verifying.resources[0].verifying = true;
        let mut done = before.clone();
        done.resources[0].verify_mismatched_bytes = 8192;
        let c = diff(Some(&verifying), &done);
        assert_eq!(kinds(&c), vec![(Kind::OutOfSync, None, Some("8192"))]);
        // A verify that found nothing says nothing here.
        assert!(diff(Some(&verifying), &before).is_empty());
    }

    #[test]
    fn the_journal_numbers_keeps_and_pushes() {
        let j = Journal::in_memory();
        let (seq, mut rx) = j.subscribe();
        assert_eq!(seq, 0);
        j.push("hello".into());
        j.message(Some("vol0"), "promoted".into());
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        let e = rx.try_recv().unwrap();
        assert_eq!((e.seq, e.line().as_str()), (2, "vol0: promoted"));
        for i in 0..KEPT + 10 {
            j.push(format!("{i}"));
        }
        let all = j.since_seq(0);
        assert_eq!(all.len(), KEPT);
        assert_eq!(j.last(3), all[KEPT - 3..].to_vec());
        assert_eq!(j.last(KEPT + 5).len(), KEPT);
        assert_eq!(all.last().unwrap().seq, 2 + KEPT as u64 + 10);
        let c = Change {
            kind: Kind::Link,
            resource: None,
            name: Some("udp".into()),
            old: Some("up".into()),
            new: Some("down".into()),
            reason: String::new(),
        };
        assert_eq!(j.record(c).line(), "link udp up -> down");
    }

    #[test]
    fn the_file_survives_a_restart_and_damaged_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "alpha").unwrap();
        for i in 0..5 {
            j.push(format!("event {i}"));
        }
        j.close();
        // A torn last line (power loss mid-write) and garbage.
        let path = Journal::path(dir.path(), "alpha");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n{\"seq\":99,\"at\":1.0,\"kind\":\"mess").unwrap();
        drop(f);
        let j = Journal::open(dir.path(), "alpha").unwrap();
        assert_eq!(j.damaged, 2);
        let all = j.since_seq(0);
        assert_eq!(all.len(), 5);
        assert_eq!(all[4].reason, "event 4");
        j.push("after".into());
        assert_eq!(j.last_seq(), 6, "numbers go on after a restart");
        j.close();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 6, "{text}");
        // Out-of-order and hostile lines are refused one by one.
        let (ev, bad) = parse(
            "{\"seq\":5,\"at\":1,\"kind\":\"message\"}\n{\"seq\":3,\"at\":1,\"kind\":\"message\"}\n{\"seq\":6,\"at\":1,\"kind\":\"nope\"}\n\u{0}\u{ff}\n",
        );
        assert_eq!((ev.len(), bad), (1, 3));
    }

    #[test]
    fn the_file_is_rewritten_when_it_grows_and_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "beta").unwrap();
        for i in 0..(2 * KEPT + 50) {
            j.push(format!("e{i}"));
        }
        j.close();
        let path = Journal::path(dir.path(), "beta");
        let n = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!((KEPT..=2 * KEPT).contains(&n), "{n} lines");
        let j = Journal::open(dir.path(), "beta").unwrap();
        assert_eq!(j.last_seq(), 2 * KEPT as u64 + 50);
        j.close();
        let other = dir.path().join("elsewhere");
        std::fs::write(&other, "x").unwrap();
        std::os::unix::fs::symlink(&other, Journal::path(dir.path(), "gamma")).unwrap();
        assert!(Journal::open(dir.path(), "gamma").is_err(), "a symbolic link is not followed");
    }
}
