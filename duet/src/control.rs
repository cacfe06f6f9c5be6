//! The control protocol between `duet <command>` and the daemon: one JSON object per line over a
//! Unix socket (mode 0600), one request and one response per connection. Every message carries
//! `v`, the sender's highest protocol version. The envelope (`v`, `ok`, `result` | `error`) never
//! changes; a version that only adds commands or fields keeps [`MIN_VERSION`], so each side takes
//! any version from its own minimum up (a newer CLI may talk to the daemon that is still running
//! after a package upgrade, and names a command the older one lacks in a clear "bad request"),
//! and refuses an older one below it with a message naming both.

use serde::{Deserialize, Serialize};

/// The highest version this build speaks.
pub const VERSION: u32 = 1;
/// The lowest.
pub const MIN_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version.
    pub v: u32,
    /// What to do.
    #[serde(flatten)]
    pub cmd: Command,
}

/// The commands the daemon understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Report roles, states, and counters.
    Status,
    /// Become Primary (`force`: even without UpToDate data).
    Primary {
        #[serde(default)]
        resource: Option<String>,
        #[serde(default)]
        force: bool,
    },
    /// Close the export and become Secondary.
    Secondary {
        #[serde(default)]
        resource: Option<String>,
    },
    /// Connect to the peer (`discard_my_data`: be the split-brain victim).
    Connect {
        #[serde(default)]
        resource: Option<String>,
        #[serde(default)]
        discard_my_data: bool,
    },
    /// Drop the peer link and stay StandAlone.
    Disconnect {
        #[serde(default)]
        resource: Option<String>,
    },
    /// Mark every block out of sync; full resync from the peer.
    Invalidate {
        #[serde(default)]
        resource: Option<String>,
    },
    /// Retry the requests a failing disk holds (`on_io_error = "freeze"`).
    ResumeIo {
        #[serde(default)]
        resource: Option<String>,
    },
    /// Online verify.
    Verify {
        #[serde(default)]
        resource: Option<String>,
        #[serde(default)]
        repair: bool,
    },
    /// Coordinated switchover: make this node the running master.
    MakeMaster {
        #[serde(default)]
        force: bool,
    },
    /// Coordinated switchover: hand the master role to the peer.
    MakeSlave,
    /// Stream events as they happen on this connection: the current state as `exists` records,
    /// then (with `since_seq`) the stored events after that number, then each new event; one
    /// JSON object per line after the response.
    Follow {
        #[serde(default)]
        since_seq: Option<u64>,
    },
    /// Re-read the configuration file and apply what can change live (`duet adjust`).
    Adjust,
    /// Maintenance mode on or off, cluster-wide (`duet maintenance on|off`).
    Maintenance { on: bool },
    /// The event log after a time (milliseconds since the Unix epoch).
    Events {
        #[serde(default)]
        since_ms: u64,
    },
}

impl Command {
    /// The resource a command names (None: all).
    pub fn resource(&self) -> Option<&str> {
        match self {
            Self::Status
            | Self::MakeMaster { .. }
            | Self::MakeSlave
            | Self::Adjust
            | Self::Maintenance { .. }
            | Self::Follow { .. }
            | Self::Events { .. } => None,
            Self::Primary { resource, .. }
            | Self::Secondary { resource }
            | Self::Connect { resource, .. }
            | Self::Disconnect { resource }
            | Self::Invalidate { resource }
            | Self::ResumeIo { resource }
            | Self::Verify { resource, .. } => resource.as_deref(),
        }
    }
}

/// What a command needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Looks: status, events.
    Read,
    /// Changes something.
    Admin,
}

impl Command {
    /// What the command needs: `status` and `events` only look; everything else acts.
    pub fn needs(&self) -> Access {
        match self {
            Self::Status | Self::Events { .. } | Self::Follow { .. } => Access::Read,
            _ => Access::Admin,
        }
    }
}

/// A caller on the control socket: its uid and every group it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub groups: Vec<u32>,
}

/// Who may do what: root and the daemon's own user always; members of `admin` anything; members
/// of `read` status and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub owner: u32,
    pub admin: Option<u32>,
    pub read: Option<u32>,
}

/// A caller refused: what it asked needs more than it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "permission denied: uid {0} may not change anything here; run as root or as a member of the admin_group"
    )]
    Admin(u32),
    #[error(
        "permission denied: uid {0} may not read this daemon's state; run as root or as a member of the read_group or admin_group"
    )]
    Read(u32),
}

impl Policy {
    /// Whether `c` may run a command that needs `need`; the refusal says what would allow it.
    pub fn check(&self, c: &Caller, need: Access) -> Result<(), Denied> {
        let member = |g: Option<u32>| g.is_some_and(|g| c.groups.contains(&g));
        if c.uid == 0 || c.uid == self.owner || member(self.admin) {
            return Ok(());
        }
        if need == Access::Read && member(self.read) {
            return Ok(());
        }
        Err(match need {
            Access::Admin => Denied::Admin(c.uid),
            Access::Read => Denied::Read(c.uid),
        })
    }
}

/// A response from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Success, with the result; or failure with a reason.
    #[serde(flatten)]
    pub body: Body,
}

/// Result or error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ok")]
pub enum Body {
    /// The command worked.
    #[serde(rename = "true")]
    Ok { result: serde_json::Value },
    /// It did not, and why.
    #[serde(rename = "false")]
    Err { error: String },
}

impl Response {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Self { v: VERSION, body: Body::Ok { result } }
    }
    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Self { v: VERSION, body: Body::Err { error: error.into() } }
    }
}

/// Why a request line was refused (the message sent back).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("request is not JSON: {0}")]
    NotJson(String),
    #[error(
        "control protocol version {0} is older than this daemon speaks ({MIN_VERSION} to {VERSION}); use the duet CLI of the daemon's release"
    )]
    Version(u64),
    #[error("request has no protocol version \"v\"")]
    NoVersion,
    #[error("bad request: {0}")]
    Bad(String),
}

/// Decodes a request line.
pub fn decode_request(line: &[u8]) -> Result<Request, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v >= u64::from(MIN_VERSION) => {}
        Some(v) => return Err(DecodeError::Version(v)),
        None => return Err(DecodeError::NoVersion),
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Bad(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_lets_root_the_owner_and_the_groups_do_what_they_may() {
        let p = Policy { owner: 500, admin: Some(10), read: Some(20) };
        let who = |uid, groups: &[u32]| Caller { uid, groups: groups.to_vec() };
        for (c, read, admin) in [
            (who(0, &[]), true, true),
            (who(500, &[]), true, true),
            (who(1000, &[10]), true, true),
            (who(1000, &[20]), true, false),
            (who(1000, &[30, 20]), true, false),
            (who(1000, &[30]), false, false),
            (who(1000, &[]), false, false),
        ] {
            assert_eq!(p.check(&c, Access::Read).is_ok(), read, "{c:?}");
            assert_eq!(p.check(&c, Access::Admin).is_ok(), admin, "{c:?}");
        }
        let none = Policy { owner: 0, admin: None, read: None };
        assert!(none.check(&who(1000, &[0]), Access::Read).is_err(), "group 0 is not root");
        let e = p.check(&who(1000, &[20]), Access::Admin).unwrap_err().to_string();
        assert!(e.contains("uid 1000") && e.contains("admin_group"), "{e}");
        assert_eq!(Command::Status.needs(), Access::Read);
        assert_eq!(Command::Events { since_ms: 0 }.needs(), Access::Read);
        for c in [
            Command::MakeSlave,
            Command::MakeMaster { force: false },
            Command::Invalidate { resource: None },
            Command::Adjust,
            Command::Maintenance { on: false },
        ] {
            assert_eq!(c.needs(), Access::Admin, "{c:?}");
        }
    }

    #[test]
    fn round_trip() {
        let r = Request { v: VERSION, cmd: Command::Status };
        let line = serde_json::to_vec(&r).unwrap();
        assert_eq!(std::str::from_utf8(&line).unwrap(), r#"{"v":1,"cmd":"status"}"#);
        assert_eq!(decode_request(&line).unwrap(), r);
        let resp = Response::ok(serde_json::json!({"a": 1}));
        let s = serde_json::to_string(&resp).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), resp);
        let e = Response::err("no");
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
    }

    #[test]
    fn hostile_requests() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not JSON"),
            (b"\xff\xfe", "not JSON"),
            (br#"{"cmd":"status"}"#, "no protocol version"),
            (br#"{"v":0,"cmd":"status"}"#, "version 0 is older than this daemon speaks"),
            (br#"{"v":4294967296,"cmd":"status"}"#, "bad request"),
            (br#"{"v":-1,"cmd":"status"}"#, "no protocol version"),
            (br#"{"v":1,"cmd":"format-disk"}"#, "bad request"),
            (br#"{"v":1}"#, "bad request"),
            (br#"[1,2,3]"#, "no protocol version"),
            (br#"{"v":1,"cmd":"make-master","force":"yes"}"#, "bad request"),
            (br#"{"v":1,"cmd":"events","since_ms":"soon"}"#, "bad request"),
            (br#"{"v":1,"cmd":"events","since_ms":-1}"#, "bad request"),
            (br#"{"v":1,"cmd":"make_slave"}"#, "bad request"),
            (br#"{"v":1,"cmd":"maintenance"}"#, "bad request"),
            (br#"{"v":1,"cmd":"maintenance","on":"yes"}"#, "bad request"),
            (br#"{"v":1,"cmd":"maintenance","on":1}"#, "bad request"),
            (br#"{"v":1,"cmd":"resume-io","resource":5}"#, "bad request"),
            (br#"{"v":1,"cmd":"resume_io"}"#, "bad request"),
        ];
        for (line, want) in cases {
            let e = decode_request(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line:?}: {e}");
        }
        assert_eq!(decode_request(&vec![b' '; MAX_LINE + 1]), Err(DecodeError::TooLong));
    }

    #[test]
    fn a_newer_cli_is_understood_as_far_as_this_daemon_goes() {
        let newer = VERSION + 1;
        let line = format!(r#"{{"v":{newer},"cmd":"status"}}"#);
        assert_eq!(decode_request(line.as_bytes()).unwrap().cmd, Command::Status);
        let line = format!(r#"{{"v":{newer},"cmd":"grow-volume"}}"#);
        let e = decode_request(line.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("bad request: unknown variant `grow-volume`"), "{e}");
    }
}
