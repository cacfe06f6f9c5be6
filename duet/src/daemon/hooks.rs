//! `[hooks]`: the commands run when something happens. Each follows the event log ([`which`]
//! picks the hook of an event, a pure function), runs one at a time in order with `DUET_*`
//! variables and `hooks.timeout_ms`, and its result goes back into the log. The configuration
//! is read when the hook runs, so `duet adjust` changes them live.
//!
//! `before_resync_target` is not an event's: the resync waits for it (see
//! [`before_resync_target`]).

use super::*;
use crate::events::{Event, Kind};

/// The hook an event calls, and the variables particular to it.
pub fn which(
    e: &Event,
    cluster_manager: bool,
) -> Option<(&'static str, Vec<(&'static str, String)>)> {
    if e.record != crate::events::Record::Change {
        return None;
    }
    let new = e.new.clone().unwrap_or_default();
    let old = e.old.clone().unwrap_or_default();
    match e.kind {
        Kind::SplitBrain if new == "yes" => {
            Some(("split_brain", vec![("DUET_REASON", e.reason.clone())]))
        }
        Kind::OutOfSync => Some(("out_of_sync", vec![("DUET_OUT_OF_SYNC_BYTES", new)])),
        Kind::IoError => Some((
            "io_error",
            vec![
                ("DUET_DISK", e.name.clone().unwrap_or_default()),
                ("DUET_ACTION", new),
                ("DUET_REASON", e.reason.clone()),
            ],
        )),
        Kind::PriLostAfterSb => {
            Some(("pri_lost_after_sb", vec![("DUET_REASON", e.reason.clone())]))
        }
        Kind::Connection if old == "SyncTarget" && new == "Connected" => {
            Some(("after_resync_target", Vec::new()))
        }
        // A change from a state, not the first state after a start.
        Kind::RunningRole if cluster_manager && !old.is_empty() => {
            Some(("role_change", vec![("DUET_OLD_ROLE", old), ("DUET_NEW_ROLE", new)]))
        }
        Kind::Role if !cluster_manager && !old.is_empty() => {
            Some(("role_change", vec![("DUET_OLD_ROLE", old), ("DUET_NEW_ROLE", new)]))
        }
        _ => None,
    }
}

/// The command configured for `hook` (empty: none).
fn command<'a>(h: &'a crate::config::Hooks, hook: &str) -> &'a str {
    match hook {
        "split_brain" => &h.split_brain,
        "out_of_sync" => &h.out_of_sync,
        "before_resync_target" => &h.before_resync_target,
        "after_resync_target" => &h.after_resync_target,
        "role_change" => &h.role_change,
        "pri_lost_after_sb" => &h.pri_lost_after_sb,
        "io_error" => &h.io_error,
        _ => "",
    }
}

/// Runs `hook` of `cfg` (if set) with the common variables and `extra`; `Ok(None)` when none
/// is configured, else its exit code or why it did not run to the end.
async fn run(
    cfg: &Config,
    node: &str,
    hook: &'static str,
    resource: Option<&str>,
    extra: &[(&str, String)],
) -> Result<Option<i32>, String> {
    let cmd = command(&cfg.hooks, hook).trim().to_string();
    if cmd.is_empty() {
        return Ok(None);
    }
    let peer = cfg.peer_of(node).unwrap_or("").to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("DUET_HOOK", hook),
        ("DUET_NODE", node),
        ("DUET_PEER", &peer),
        ("DUET_CLUSTER", &cfg.cluster.name),
        ("DUET_RESOURCE", resource.unwrap_or("")),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
    let timeout = std::time::Duration::from_millis(cfg.hooks.timeout_ms);
    match crate::ha::shell(&cmd, &env, timeout).await {
        Ok(Some(0)) => Ok(Some(0)),
        Ok(code) => {
            Err(format!("exited with {}", code.map_or("a signal".into(), |c| c.to_string())))
        }
        Err(e) => Err(crate::error_chain(&e)),
    }
}

/// Follows the event log and runs each event's hook, one at a time.
pub(super) async fn run_hooks(state: Arc<State>, mut sd: watch::Receiver<bool>) {
    use tokio::sync::broadcast::error::RecvError;
    let (_, mut rx) = state.journal.subscribe();
    let cluster_manager = state.ha.get().is_some();
    loop {
        let e = tokio::select! {
            r = rx.recv() => match r {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    state.journal.push(format!("hooks: {n} events went by too fast to run their hooks"));
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            _ = stopped(&mut sd) => return,
        };
        let Some((hook, mut extra)) = which(&e, cluster_manager) else { continue };
        let cfg = Arc::clone(&state.live.lock().expect("config poisoned"));
        extra.push(("DUET_EVENT_SEQ", e.seq.to_string()));
        let r = run(&cfg, &state.node, hook, e.resource.as_deref(), &extra).await;
        let res = e.resource.as_deref();
        match r {
            Ok(None) => {}
            Ok(Some(_)) => state.journal.message(res, format!("hook {hook} ran (exit 0)")),
            Err(why) => {
                tracing::warn!(resource = res.unwrap_or(""), "hook {hook} failed: {why}");
                state.journal.message(res, format!("hook {hook} failed: {why}"));
            }
        }
    }
}

/// The `before_resync_target` hook of resource `resource`, as the replicator calls it: the
/// command of the configuration as it is when the resync starts.
pub(super) fn before_resync_target(
    live: Arc<std::sync::Mutex<Arc<Config>>>,
    node: String,
    resource: String,
) -> replicator::repl::volume::BeforeResync {
    replicator::repl::volume::BeforeResync(Box::new(move || {
        let cfg = Arc::clone(&live.lock().expect("config poisoned"));
        let (node, resource) = (node.clone(), resource.clone());
        Box::pin(async move {
            run(&cfg, &node, "before_resync_target", Some(&resource), &[]).await.map(|_| ())
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Change, Journal};

    fn ev(kind: Kind, old: Option<&str>, new: &str) -> Event {
        Journal::in_memory().record(Change {
            kind,
            resource: Some("vol0".into()),
            name: None,
            old: old.map(str::to_string),
            new: Some(new.into()),
            reason: "why".into(),
        })
    }

    #[test]
    fn each_event_calls_its_hook_with_its_variables() {
        let (h, env) = which(&ev(Kind::SplitBrain, Some("no"), "yes"), true).unwrap();
        assert_eq!((h, env), ("split_brain", vec![("DUET_REASON", "why".to_string())]));
        assert!(which(&ev(Kind::SplitBrain, Some("yes"), "no"), true).is_none(), "resolved");
        let (h, env) = which(&ev(Kind::PriLostAfterSb, None, "yes"), true).unwrap();
        assert_eq!((h, env[0].1.as_str()), ("pri_lost_after_sb", "why"));
        let (h, env) = which(&ev(Kind::OutOfSync, None, "8192"), true).unwrap();
        assert_eq!((h, env[0].1.as_str()), ("out_of_sync", "8192"));
        let (h, _) = which(&ev(Kind::Connection, Some("SyncTarget"), "Connected"), true).unwrap();
        assert_eq!(h, "after_resync_target");
        assert!(which(&ev(Kind::Connection, Some("SyncTarget"), "Connecting"), true).is_none());
        let (h, env) = which(&ev(Kind::RunningRole, Some("slave"), "master"), true).unwrap();
        assert_eq!(h, "role_change");
        assert_eq!(
            env,
            vec![("DUET_OLD_ROLE", "slave".into()), ("DUET_NEW_ROLE", "master".into())]
        );
        // With a cluster manager the running role is what changes roles; without, the resource.
        assert!(which(&ev(Kind::Role, Some("Secondary"), "Primary"), true).is_none());
        assert!(which(&ev(Kind::Role, Some("Secondary"), "Primary"), false).is_some());
        // The first state after a start is not a change.
        assert!(which(&ev(Kind::RunningRole, None, "slave"), true).is_none());
        assert!(which(&ev(Kind::Message, None, "x"), true).is_none());
        let mut exists = ev(Kind::SplitBrain, Some("no"), "yes");
        exists.record = crate::events::Record::Exists;
        assert!(which(&exists, true).is_none());
    }
}
