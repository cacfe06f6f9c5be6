//! The control socket: the daemon's server (one JSON line in, one out) and the CLI's client.

use super::*;

pub(super) async fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
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
    let l = UnixListener::bind(path).map_err(failed("cannot bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(failed("cannot set mode 0600 on"))?;
    Ok(l)
}

pub(super) async fn serve_control(
    l: UnixListener,
    state: Arc<State>,
    mut sd: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = l.accept() => {
                let Ok((s, _)) = r else { continue };
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    let _ = handle_control(s, &st).await;
                });
            }
            _ = stopped(&mut sd) => return,
        }
    }
}

pub(super) async fn handle_control(s: UnixStream, state: &State) -> std::io::Result<()> {
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
            Ok(req) => match &req.cmd {
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
                Command::MakeSlave => match state.switchover(false, false).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e.to_string()),
                },
                cmd => match state.act(cmd.resource(), cmd).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e.to_string()),
                },
            },
        },
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
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
    if resp.v != control::VERSION {
        return Err(CallError::Protocol(format!(
            "daemon speaks control protocol {} and this CLI speaks {}; use the CLI of the daemon's release",
            resp.v,
            control::VERSION
        )));
    }
    match resp.body {
        control::Body::Ok { result } => Ok(result),
        control::Body::Err { error } => Err(CallError::Refused(error)),
    }
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
