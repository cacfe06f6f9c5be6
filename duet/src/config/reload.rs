//! Live reload (`duet adjust`, SIGHUP): which keys changed between the running configuration
//! and the file now, and whether every one of them can be applied without a restart. A change
//! that cannot (an address, a disk, a protocol, a node) refuses the whole reload, naming the key:
//! nothing is half applied.
//!
//! The comparison is of the two files' TOML trees, so a key is named as the file spells it
//! (`resource[0].on.alpha.replication_address`), and a key written out with its default value
//! counts as a change of that key.

use toml::Value;

/// Keys applied live, as patterns: `*` stands for one array index or table key.
const LIVE: [&str; 15] = [
    "resource[*].resync.mode",
    "resource[*].resync.rate_kib",
    "resource[*].resync.plan_ahead_ms",
    "resource[*].resync.fill_target_kib",
    "resource[*].resync.delay_target_ms",
    "resource[*].resync.max_rate_kib",
    "resource[*].resync.min_rate_kib",
    "heartbeat.keepalive_ms",
    "heartbeat.warntime_ms",
    "heartbeat.deadtime_ms",
    "heartbeat.initdead_ms",
    "health",
    "service",
    "hooks",
    "vip",
];

/// A reload refused: the first key whose change needs a restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "{key} changed, and that needs a restart of the daemon (nothing was applied; live changes are the resync rates, the heartbeat timing, [[health.check]], [[service]], [hooks] and [[vip]])"
    )]
    NeedsRestart { key: String },
    #[error("the configuration file is not valid TOML: {0}")]
    Toml(String),
}

/// Every key whose value differs between `old` and `new` (TOML texts), as dotted paths.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>, ReloadError> {
    let a: Value = toml::from_str(old).map_err(|e| ReloadError::Toml(e.message().into()))?;
    let b: Value = toml::from_str(new).map_err(|e| ReloadError::Toml(e.message().into()))?;
    let mut out = Vec::new();
    diff("", Some(&a), Some(&b), &mut out);
    Ok(out)
}

/// `Some(Some(t))` for a table, `Some(None)` for nothing, `None` for any other value.
fn table(v: Option<&Value>) -> Option<Option<&toml::map::Map<String, Value>>> {
    match v {
        Some(Value::Table(t)) => Some(Some(t)),
        None => Some(None),
        Some(_) => None,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn diff(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
    let empty = toml::map::Map::new();
    // A table against a table or nothing: key by key (a table added lists each key in it).
    if let (Some(x), Some(y)) = (table(a), table(b))
        && (x.is_some() || y.is_some())
    {
        if x.is_none_or(|t| t.is_empty()) && y.is_none_or(|t| t.is_empty()) && x != y {
            // An empty table added or removed (`[node.c]`): the table is the key.
            out.push(path.to_string());
            return;
        }
        let (x, y) = (x.unwrap_or(&empty), y.unwrap_or(&empty));
        let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            diff(&join(path, k), x.get(k), y.get(k), out);
        }
        return;
    }
    match (a, b) {
        // Arrays of tables of one length: entry by entry (`resource[0]...`).
        (Some(Value::Array(x)), Some(Value::Array(y)))
            if x.len() == y.len() && x.iter().chain(y).all(Value::is_table) =>
        {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), Some(p), Some(q), out);
            }
        }
        (x, y) if x != y => out.push(path.to_string()),
        _ => {}
    }
}

/// Whether `key` (a dotted path) matches `pattern`: equal, or `pattern` is a prefix of it up
/// to a `.` or `[`, with `*` matching any one index or key.
fn matches(pattern: &str, key: &str) -> bool {
    let norm = |s: &str| s.replace('[', ".[");
    let (p, k) = (norm(pattern), norm(key));
    let ps: Vec<&str> = p.split('.').collect();
    let ks: Vec<&str> = k.split('.').collect();
    ks.len() >= ps.len()
        && ps.iter().zip(&ks).all(|(p, k)| *p == *k || (*p == "[*]" && k.starts_with('[')))
}

/// The changed keys if every one can be applied live; else the first that cannot.
pub fn plan(old: &str, new: &str) -> Result<Vec<String>, ReloadError> {
    let keys = changed_keys(old, new)?;
    if let Some(k) = keys.iter().find(|k| !LIVE.iter().any(|p| matches(p, k))) {
        return Err(ReloadError::NeedsRestart { key: k.clone() });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[cluster]
name = "c"
[node.a]
[node.b]
[[resource]]
name = "r0"
[resource.on.a]
replication_address = "10.0.0.1:7789"
[resource.resync]
rate_kib = 1000
[[resource]]
name = "r1"
[[service]]
name = "nfs"
start = "true"
"#;

    #[test]
    fn the_same_file_changes_nothing_and_comments_do_not_count() {
        assert_eq!(plan(BASE, BASE).unwrap(), Vec::<String>::new());
        let commented = BASE.replace("rate_kib = 1000", "# faster\nrate_kib = 1000 # KiB/s");
        assert_eq!(plan(BASE, &commented).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn live_keys_are_listed_and_others_refused_by_name() {
        let faster = BASE.replace("rate_kib = 1000", "rate_kib = 2000\nmax_rate_kib = 3000");
        assert_eq!(
            plan(BASE, &faster).unwrap(),
            vec!["resource[0].resync.max_rate_kib", "resource[0].resync.rate_kib"]
        );
        let added =
            BASE.replace("name = \"r1\"", "name = \"r1\"\n[resource.resync]\nmin_rate_kib = 10");
        assert_eq!(plan(BASE, &added).unwrap(), vec!["resource[1].resync.min_rate_kib"]);
        let svc = BASE.replace("start = \"true\"", "start = \"systemctl start nfs\"");
        assert_eq!(plan(BASE, &svc).unwrap(), vec!["service[0].start"]);
        let hooks = format!("{BASE}\n[hooks]\nsplit_brain = \"/bin/true\"\n");
        assert_eq!(plan(BASE, &hooks).unwrap(), vec!["hooks.split_brain"]);
        let vip = format!("{BASE}\n[[vip]]\ninterface = \"lan0\"\naddress = \"10.0.0.9/24\"\n");
        assert_eq!(plan(BASE, &vip).unwrap(), vec!["vip"]);
        let moved = vip.replace("10.0.0.9/24", "10.0.0.10/24");
        assert_eq!(plan(&vip, &moved).unwrap(), vec!["vip[0].address"]);
        let hb =
            format!("{BASE}\n[heartbeat]\ndeadtime_ms = 3000\n[[health.check]]\nname = \"x\"\n");
        assert_eq!(
            plan(BASE, &hb).unwrap(),
            vec!["health.check", "heartbeat.deadtime_ms"],
            "heartbeat timing and health checks are live"
        );
        let link = format!("{BASE}\n[[heartbeat.link]]\nkind = \"udp\"\n");
        assert_eq!(
            plan(BASE, &link).unwrap_err(),
            ReloadError::NeedsRestart { key: "heartbeat.link".into() }
        );

        for (from, to, key) in [
            ("10.0.0.1:7789", "10.0.0.9:7789", "resource[0].on.a.replication_address"),
            ("name = \"r1\"", "name = \"r2\"", "resource[1].name"),
            ("name = \"c\"", "name = \"d\"", "cluster.name"),
            ("[node.b]", "[node.b]\n[node.c]", "node.c"),
            ("rate_kib = 1000", "rate_kib = 1000\nchecksum = true", "resource[0].resync.checksum"),
            (
                "rate_kib = 1000",
                "rate_kib = 1000\nreplication_rate_limit_kib = 5",
                "resource[0].resync.replication_rate_limit_kib",
            ),
        ] {
            let e = plan(BASE, &BASE.replace(from, to)).unwrap_err();
            assert_eq!(e, ReloadError::NeedsRestart { key: key.into() }, "{to}");
            assert!(e.to_string().contains(key) && e.to_string().contains("restart"), "{e}");
        }
        // A resource added or removed is an array of another length: the array is the key.
        let more = format!("{BASE}\n[[resource]]\nname = \"r9\"\n");
        let e = plan(BASE, &more).unwrap_err();
        assert_eq!(e, ReloadError::NeedsRestart { key: "resource".into() });
        // A service added is live; `service` is the key.
        let svc2 = format!("{BASE}\n[[service]]\nname = \"smb\"\nstart = \"true\"\n");
        assert_eq!(plan(BASE, &svc2).unwrap(), vec!["service"]);
    }

    #[test]
    fn bad_toml_is_refused_with_its_reason() {
        let e = plan(BASE, "[cluster\nname=").unwrap_err();
        assert!(matches!(e, ReloadError::Toml(_)), "{e:?}");
        assert!(!matches("service", "services"), "a pattern is matched by whole keys");
        assert!(matches("resource[*].resync.rate_kib", "resource[12].resync.rate_kib"));
        assert!(!matches("resource[*].resync.rate_kib", "resource.resync.rate_kib"));
    }
}
