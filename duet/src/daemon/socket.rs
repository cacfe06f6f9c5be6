//! The control socket: the daemon's server (one JSON line in, one out) and the CLI's client.

use super::*;

/// `duet events --follow` connections served at once.
pub(super) const FOLLOWERS: usize = 64;

/// Binds the control socket: mode 0600 (root and the daemon's user only), or 0666 when groups
/// may use it (each caller is then checked by its credentials, [`control::Policy`]). The socket
/// appears at its path with its mode set: bound under a temporary name, chmod-ed, renamed.
pub(super) async fn bind_control(path: &Path, shared: bool) -> Result<UnixListener, DaemonError> {
    let failed =
        |what| move |source| DaemonError::ControlSocket { what, path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|source| DaemonError::ControlDir { dir: dir.to_path_buf(), source })?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::ControlInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(failed("removing stale"))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(failed("cannot bind"))?;
    let mode = if shared { 0o666 } else { 0o600 };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(failed("cannot set the mode of"))?;
    std::fs::rename(&tmp, path).map_err(failed("cannot move into place"))?;
    Ok(l)
}

pub(super) async fn serve_control(
    l: UnixListener,
    state: Arc<State>,
    policy: control::Policy,
    mut sd: watch::Receiver<bool>,
) {
    let accept_log = replicator::ratelimit::Limited::new(5, std::time::Duration::from_secs(30));
    loop {
        tokio::select! {
            r = l.accept() => {
                let s = match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors: a breath, not a spin.
                        replicator::warn_limited!(accept_log, error = %e, "control socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    let caller = caller_of(&s, &policy);
                    let _ = handle_control(s, &st, policy, caller).await;
                });
            }
            _ = stopped(&mut sd) => return,
        }
    }
}

/// The caller's uid and groups (its primary group and, if it has a passwd entry, every group
/// /etc/group gives it); `None` when the kernel does not say. The groups are looked up only
/// when they can matter: root and the daemon's own user need none, nor does a policy with none.
fn caller_of(s: &UnixStream, policy: &control::Policy) -> Option<control::Caller> {
    let cred = s.peer_cred().ok()?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let mut groups = vec![gid];
    let matters =
        uid != 0 && uid != policy.owner && (policy.admin.is_some() || policy.read.is_some());
    if matters
        && let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        && let Ok(name) = std::ffi::CString::new(u.name)
        && let Ok(gs) = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
    {
        groups.extend(gs.iter().map(|g| g.as_raw()));
    }
    Some(control::Caller { uid, groups })
}

pub(super) async fn handle_control(
    s: UnixStream,
    state: &State,
    policy: control::Policy,
    caller: Option<control::Caller>,
) -> std::io::Result<()> {
    let (rd, mut wr) = s.into_split();
    let mut line = Vec::new();
    let mut rd = BufReader::new(rd).take(control::MAX_LINE as u64 + 1);
    let resp = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        rd.read_until(b'\n', &mut line),
    )
    .await
    {
        Err(_) => Response::err("timed out waiting for a request"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => match control::decode_request(line.trim_ascii()) {
            Err(e) => Response::err(e.to_string()),
            Ok(req) => match caller.as_ref().map(|c| policy.check(c, req.cmd.needs())) {
                None => Response::err("permission denied: the caller's credentials are unknown"),
                Some(Err(why)) => Response::err(why.to_string()),
                Some(Ok(())) => {
                    if let Command::Follow { since_seq } = req.cmd {
                        return serve_follow(rd.into_inner().into_inner(), wr, state, since_seq)
                            .await;
                    }
                    answer(&req.cmd, state).await
                }
            },
        },
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
}

async fn write_line(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    v: &impl serde::Serialize,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
}

/// `duet events --follow`: the response, the current state as `exists` records, the stored
/// events after `since_seq` (if given), then each event as it is recorded, until the daemon
/// stops, the client hangs up, or it falls [`crate::events::FOLLOW_BACKLOG`] events behind (it
/// is told, and cut off).
async fn serve_follow(
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    state: &State,
    since_seq: Option<u64>,
) -> std::io::Result<()> {
    use crate::events::{Event, Record, diff, snap};
    use tokio::sync::broadcast::error::RecvError;
    let Ok(_slot) = Arc::clone(&state.followers).try_acquire_owned() else {
        let why = format!("too many followers ({FOLLOWERS}); try again later");
        return write_line(&mut wr, &Response::err(why)).await;
    };
    if *state.sd.borrow() {
        return write_line(&mut wr, &Response::err("the daemon is shutting down")).await;
    }
    let (seq, mut rx) = state.journal.subscribe();
    write_line(&mut wr, &Response::ok(serde_json::json!({ "follow": true, "seq": seq }))).await?;
    let now = crate::events::unix_now();
    for c in diff(None, &snap(&state.status().await)) {
        let e = Event {
            seq,
            at: now,
            record: Record::Exists,
            kind: c.kind,
            resource: c.resource,
            name: c.name,
            old: None,
            new: c.new,
            reason: c.reason,
        };
        write_line(&mut wr, &e).await?;
    }
    if let Some(since) = since_seq {
        for e in state.journal.since_seq(since).into_iter().filter(|e| e.seq <= seq) {
            write_line(&mut wr, &e).await?;
        }
    }
    let mut sd = state.sd.clone();
    let mut byte = [0u8; 64];
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(e) => write_line(&mut wr, &e).await?,
                Err(RecvError::Lagged(n)) => {
                    let why = format!("this follower fell {n} events behind and was cut off; follow again (with since_seq) to catch up");
                    return write_line(&mut wr, &Response::err(why)).await;
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            // The client hung up (or sent something: nothing more is expected).
            r = rd.read(&mut byte) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            _ = stopped(&mut sd) => return Ok(()),
        }
    }
}

/// The daemon's answer to a command its caller may run.
async fn answer(cmd: &Command, state: &State) -> Response {
    match cmd {
        Command::Status => {
            Response::ok(serde_json::to_value(state.status().await).unwrap_or_default())
        }
        cmd if *state.sd.borrow() => {
            let _ = cmd;
            Response::err("the daemon is shutting down")
        }
        Command::Events { since_ms } => {
            Response::ok(serde_json::to_value(state.events(*since_ms)).unwrap_or_default())
        }
        Command::MakeMaster { force } => match state.switchover(true, *force).await {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.to_string()),
        },
        Command::Adjust => match state.reload().await {
            Ok(keys) => Response::ok(serde_json::json!({ "applied": keys })),
            Err(e) => Response::err(e.to_string()),
        },
        Command::Maintenance { on } => match state.maintenance(*on).await {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.to_string()),
        },
        Command::MakeSlave => match state.switchover(false, false).await {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.to_string()),
        },
        Command::Follow { .. } => Response::err("follow is a stream: it is answered on its own"),
        cmd => match state.act(cmd.resource(), cmd).await {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.to_string()),
        },
    }
}

/// Sends one request to the daemon of `node` and returns its result.
pub async fn call(sock: &PathBuf, cmd: Command) -> Result<serde_json::Value, CallError> {
    let s = UnixStream::connect(sock)
        .await
        .map_err(|e| CallError::Unreachable(sock.clone(), e.to_string()))?;
    let (rd, mut wr) = s.into_split();
    let mut req = serde_json::to_vec(&control::Request { v: control::VERSION, cmd })
        .expect("requests serialise");
    req.push(b'\n');
    wr.write_all(&req).await.map_err(|e| CallError::Protocol(e.to_string()))?;
    let mut line = Vec::new();
    let mut rd = BufReader::new(rd).take(16 << 20);
    rd.read_until(b'\n', &mut line).await.map_err(|e| CallError::Protocol(e.to_string()))?;
    let resp: Response = serde_json::from_slice(&line)
        .map_err(|e| CallError::Protocol(format!("bad reply: {e}")))?;
    // (See `control`: any version from ours up; the envelope does not change.)
    if resp.v < control::MIN_VERSION {
        return Err(CallError::Protocol(format!(
            "daemon speaks control protocol {} and this CLI {} to {}; use the CLI of the daemon's release",
            resp.v,
            control::MIN_VERSION,
            control::VERSION
        )));
    }
    match resp.body {
        control::Body::Ok { result } => Ok(result),
        control::Body::Err { error } => Err(CallError::Refused(error)),
    }
}

/// Follows the daemon's events (`duet events --follow`): `each` gets every record as it
/// arrives (the current state first, as `exists` records) and returns false to stop. Returns
/// when the daemon ends the stream (it stopped, or cut this follower off: the error says why).
pub async fn follow(
    sock: &PathBuf,
    since_seq: Option<u64>,
    mut each: impl FnMut(crate::events::Event) -> bool,
) -> Result<(), CallError> {
    let s = UnixStream::connect(sock)
        .await
        .map_err(|e| CallError::Unreachable(sock.clone(), e.to_string()))?;
    let (rd, mut wr) = s.into_split();
    let cmd = Command::Follow { since_seq };
    let mut req = serde_json::to_vec(&control::Request { v: control::VERSION, cmd })
        .expect("requests serialise");
    req.push(b'\n');
    wr.write_all(&req).await.map_err(|e| CallError::Protocol(e.to_string()))?;
    let mut lines = BufReader::new(rd).lines();
    let mut first = true;
    while let Some(line) =
        lines.next_line().await.map_err(|e| CallError::Protocol(e.to_string()))?
    {
        if line.len() > control::MAX_LINE {
            return Err(CallError::Protocol("event line too long".into()));
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| CallError::Protocol(format!("bad reply: {e}")))?;
        // The response first; later a response only to say why the stream ends.
        if first || v.get("ok").is_some() {
            let resp: Response = serde_json::from_value(v)
                .map_err(|e| CallError::Protocol(format!("bad reply: {e}")))?;
            if let control::Body::Err { error } = resp.body {
                return Err(CallError::Refused(error));
            }
            first = false;
            continue;
        }
        let e: crate::events::Event = serde_json::from_value(v)
            .map_err(|e| CallError::Protocol(format!("bad event: {e}")))?;
        if !each(e) {
            return Ok(());
        }
    }
    Ok(())
}

/// Why a CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No daemon listening.
    #[error("cannot reach the duet daemon at {0}: {1}; is it running (duet daemon)?")]
    Unreachable(PathBuf, String),
    /// The exchange broke.
    #[error("control protocol error: {0}")]
    Protocol(String),
    /// The daemon said no.
    #[error("{0}")]
    Refused(String),
}
