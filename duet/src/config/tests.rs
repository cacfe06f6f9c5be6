use super::*;

const SINGLE: &str = r#"
[cluster]
name = "demo"
configured_master = "alpha"
control_socket = "/tmp/duet-test/duet.sock"
metrics_listen = ""

[node.alpha]

[[resource]]
name = "vol0"
nbd_listen = "127.0.0.1:10809"

[resource.on.alpha]
disk = "/tmp/duet-test/vol0.img"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

#[test]
fn example_contract_parses_and_validates() {
    let text = include_str!("../../../duet.example.toml");
    let cfg = parse(text).unwrap();
    assert_eq!(cfg.node_names(), vec!["alpha", "beta"]);
    assert_eq!(cfg.resource[0].protocol, Protocol::C);
    assert_eq!(cfg.resource[0].resync.min_rate_kib, 20_480);
    assert_eq!(cfg.heartbeat.link.len(), 2);
    assert_eq!(cfg.peer_of("alpha"), Some("beta"));
    assert_eq!(cfg.resource[0].nbd, Nbd::default(), "the example shows every default");
}

#[test]
fn single_node_defaults() {
    let cfg = parse(SINGLE).unwrap();
    let r = &cfg.resource[0];
    assert_eq!(r.io_engine, IoEngine::Auto);
    assert!(!r.direct_io);
    assert_eq!(r.on["alpha"].meta, "internal");
    assert_eq!(cfg.heartbeat.deadtime_ms, 1000);
    assert_eq!(cfg.cluster.data_threads, 1);
    assert_eq!(cfg.control_socket("alpha"), PathBuf::from("/tmp/duet-test/duet.sock"));
    assert_eq!(cfg.pick_node(None, "alpha.example.net").unwrap(), "alpha");
    assert!(cfg.pick_node(Some("beta"), "x").unwrap_err().to_string().contains("--node"));
    let e = cfg.pick_node(None, "gamma").unwrap_err().to_string();
    assert!(e.contains("hostname") && e.contains("gamma") && e.contains("--node"), "{e}");
}

#[test]
fn nbd_section_is_typed_and_checked() {
    let with =
        |nbd: &str| {
            parse(&SINGLE.replace(
                "[resource.on.alpha]",
                &format!("[resource.nbd]\n{nbd}\n[resource.on.alpha]"),
            ))
        };
    let cfg = with("tls = \"require\"\ntls_cert = \"/etc/duet/c.pem\"\ntls_key = \"/etc/duet/k.pem\"\nallow = [\"10.0.0.0/8\", \"::1/128\"]\nidle_timeout_ms = 60000").unwrap();
    let n = &cfg.resource[0].nbd;
    assert_eq!(n.tls, TlsMode::Require);
    let files = n.tls_files().unwrap();
    assert_eq!(files.cert, PathBuf::from("/etc/duet/c.pem"));
    assert_eq!(files.client_ca, None);
    let p = n.policy(None);
    assert_eq!(p.allow.len(), 2);
    assert!(p.allow[0].contains("10.1.2.3".parse().unwrap()));
    assert!(!p.allow[0].contains("11.0.0.1".parse().unwrap()));
    assert_eq!(p.idle_timeout, Some(std::time::Duration::from_secs(60)));
    assert_eq!(with("").unwrap().resource[0].nbd.tls_files(), None);
    for (nbd, key, word) in [
        ("tls = \"maybe\"", "tls", "maybe"),
        ("tls = \"require\"", "nbd.tls_cert", "missing"),
        ("tls = \"require\"\ntls_cert = \"/c.pem\"", "nbd.tls_key", "missing"),
        ("tls_cert = \"/c.pem\"", "nbd.tls_cert", "tls = \"off\""),
        (
            "tls = \"optional\"\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"",
            "nbd.tls_cert",
            "absolute",
        ),
        ("allow = [\"10.0.0.0\"]", "allow", "10.0.0.0"),
        ("allow = [\"10.0.0.0/33\"]", "allow", "10.0.0.0/33"),
        ("allow = \"10.0.0.0/8\"", "allow", "sequence"),
        ("idle_timeout_ms = 10", "nbd.idle_timeout_ms", "0 (never)"),
        ("reply_deadline_ms = 0", "nbd.reply_deadline_ms", "1000"),
        ("max_connections = 0", "nbd.max_connections", "4096"),
        ("max_connections = 10\nmax_per_source = 20", "nbd.max_per_source", "max_connections"),
        ("max_per_source = -1", "max_per_source", "-1"),
        ("bogus = 1", "bogus", "bogus"),
    ] {
        let e = with(nbd).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(word), "{nbd}: {e}");
    }
}

#[test]
fn resources_sharing_a_listener_share_its_nbd_policy() {
    let two = format!(
        "{SINGLE}\n[[resource]]\nname = \"vol1\"\nnbd_listen = \"127.0.0.1:10809\"\n[resource.nbd]\nidle_timeout_ms = 5000\n[resource.on.alpha]\ndisk = \"/tmp/duet-test/vol1.img\"\n"
    );
    let e = parse(&two).unwrap_err().to_string();
    assert!(e.contains("resource[1].nbd") && e.contains("same address"), "{e}");
    assert!(parse(&two.replace("idle_timeout_ms = 5000", "")).is_ok());
}

/// Each broken config: (what to change, key the message must name, a word of the value/fix).
#[test]
fn broken_configs_name_the_key() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("unknown key", "name = \"vol0\"", "name = \"vol0\"\nbogus = 1", "bogus"),
        ("unknown section", "[node.alpha]", "[node.alpha]\n[wat]", "wat"),
        ("missing disk", "disk = \"/tmp/duet-test/vol0.img\"", "", "disk"),
        (
            "relative disk",
            "disk = \"/tmp/duet-test/vol0.img\"",
            "disk = \"vol0.img\"",
            "resource[0].on.alpha.disk",
        ),
        (
            "bad address",
            "nbd_listen = \"127.0.0.1:10809\"",
            "nbd_listen = \"localhost\"",
            "(`nbd_listen = \"localhost\"`): \"localhost\" is not an address:port",
        ),
        (
            "bad port",
            "nbd_listen = \"127.0.0.1:10809\"",
            "nbd_listen = \"127.0.0.1:99999\"",
            "(`nbd_listen = \"127.0.0.1:99999\"`)",
        ),
        ("bad protocol", "name = \"vol0\"", "name = \"vol0\"\nprotocol = \"D\"", "protocol"),
        ("bad engine", "name = \"vol0\"", "name = \"vol0\"\nio_engine = \"aio\"", "io_engine"),
        ("wrong type", "name = \"vol0\"", "name = \"vol0\"\ndirect_io = \"yes\"", "direct_io"),
        ("bad resource name", "name = \"vol0\"", "name = \"vol 0\"", "resource[0].name"),
        (
            "unknown master",
            "configured_master = \"alpha\"",
            "configured_master = \"zeta\"",
            "cluster.configured_master",
        ),
        ("bad cluster name", "name = \"demo\"", "name = \"\"", "cluster.name"),
        (
            "relative socket",
            "control_socket = \"/tmp/duet-test/duet.sock\"",
            "control_socket = \"duet.sock\"",
            "cluster.control_socket",
        ),
        (
            "bad metrics",
            "metrics_listen = \"\"",
            "metrics_listen = \"nope\"",
            "(`metrics_listen = \"nope\"`): \"nope\" is not an address:port; write it as 192.0.2.1:10809 or [2001:db8::1]:10809, or \"\" to turn it off",
        ),
        (
            "on unknown node",
            "[resource.on.alpha]",
            "[resource.on.zeta]\ndisk = \"/x\"\n[resource.on.alpha]",
            "resource[0].on.zeta",
        ),
        (
            "granularity",
            "name = \"vol0\"",
            "name = \"vol0\"\nbitmap_granularity_kib = 3",
            "bitmap_granularity_kib",
        ),
        (
            "al extents",
            "name = \"vol0\"",
            "name = \"vol0\"\nactivity_log_extents = 3",
            "activity_log_extents",
        ),
        (
            "relative meta",
            "disk = \"/tmp/duet-test/vol0.img\"",
            "disk = \"/tmp/duet-test/vol0.img\"\nmeta = \"m.md\"",
            "meta",
        ),
        (
            "deadtime",
            "[node.alpha]",
            "[node.alpha]\n[heartbeat]\nkeepalive_ms = 500\ndeadtime_ms = 1000\nwarntime_ms = 600",
            "heartbeat.deadtime_ms",
        ),
        (
            "warntime",
            "[node.alpha]",
            "[node.alpha]\n[heartbeat]\nwarntime_ms = 2000",
            "heartbeat.warntime_ms",
        ),
        (
            "sb policy",
            "[resource.on.alpha]",
            "[resource.split_brain]\nafter_sb_0pri = \"coin-toss\"\n[resource.on.alpha]",
            "after_sb_0pri",
        ),
        (
            "sb node",
            "[resource.on.alpha]",
            "[resource.split_brain]\nafter_sb_0pri = \"discard-node-zeta\"\n[resource.on.alpha]",
            "after_sb_0pri",
        ),
        (
            "resync min>max",
            "[resource.on.alpha]",
            "[resource.resync]\nmax_rate_kib = 100\n[resource.on.alpha]",
            "min_rate_kib",
        ),
        (
            "ping timeout",
            "[resource.on.alpha]",
            "[resource.peer]\nping_timeout_ms = 7000\n[resource.on.alpha]",
            "ping_timeout_ms",
        ),
        (
            "no peer flush",
            "[resource.on.alpha]",
            "[resource.peer]\nflush_interval_ms = 0\n[resource.on.alpha]",
            "flush_interval_ms",
        ),
        (
            "peer flush too rare",
            "[resource.on.alpha]",
            "[resource.peer]\nflush_interval_ms = 70000\n[resource.on.alpha]",
            "at most 60000",
        ),
        (
            "peer flush bound too small",
            "[resource.on.alpha]",
            "[resource.peer]\nflush_after_kib = 10\n[resource.on.alpha]",
            "flush_after_kib",
        ),
        (
            "stonith w/o cmd",
            "[node.alpha]",
            "[node.alpha]\n[fencing]\npolicy = \"resource-and-stonith\"",
            "fencing.fence_command",
        ),
        ("fencing policy", "[node.alpha]", "[node.alpha]\n[fencing]\npolicy = \"shoot\"", "policy"),
        (
            "ping target",
            "[node.alpha]",
            "[node.alpha]\n[[health.check]]\nname = \"up\"\nkind = \"ping\"\ntarget = \"router\"",
            "health.check[0].target",
        ),
        (
            "check in no group",
            "[node.alpha]",
            "[node.alpha]\n[[health.check]]\nname = \"up\"\nkind = \"ping\"\ntarget = \"192.0.2.1\"\ngroup = \"wan\"",
            "health.check[0].group",
        ),
        (
            "empty group",
            "[node.alpha]",
            "[node.alpha]\n[[health.group]]\nname = \"wan\"",
            "health.group[0].name",
        ),
        (
            "duplicate group",
            "[node.alpha]",
            "[node.alpha]\n[[health.group]]\nname = \"wan\"\n[[health.group]]\nname = \"wan\"\n[[health.check]]\nname = \"up\"\nkind = \"ping\"\ntarget = \"192.0.2.1\"\ngroup = \"wan\"",
            "health.group[1].name",
        ),
        (
            "group require",
            "[node.alpha]",
            "[node.alpha]\n[[health.group]]\nname = \"wan\"\nrequire = \"most\"",
            "require",
        ),
        (
            "service stop",
            "[node.alpha]",
            "[node.alpha]\n[[service]]\nname = \"nfs\"\nstart = \"x\"\nstop = \"\"",
            "service[0].stop",
        ),
        (
            "vip address",
            "[node.alpha]",
            "[node.alpha]\n[[vip]]\ninterface = \"eth0\"\naddress = \"192.0.2.1\"",
            "(`address = \"192.0.2.1\"`): \"192.0.2.1\" is not ADDRESS/PREFIX",
        ),
        (
            "vip mac",
            "[node.alpha]",
            "[node.alpha]\n[[vip]]\ninterface = \"eth0\"\naddress = \"192.0.2.1/24\"\nmac = \"01:00:5e:00:00:01\"",
            "(`mac = \"01:00:5e:00:00:01\"`): \"01:00:5e:00:00:01\" is not a unicast MAC address",
        ),
        (
            "two vips moving a mac onto one interface",
            "[node.alpha]",
            "[node.alpha]\n[[vip]]\ninterface = \"eth0\"\naddress = \"192.0.2.1/24\"\nmac = \"02:00:5e:00:01:01\"\n[[vip]]\ninterface = \"eth0\"\naddress = \"192.0.2.2/24\"\nmac = \"02:00:5e:00:01:02\"",
            "vip[1].mac = 02:00:5e:00:01:02: vip[0] already moves a MAC onto interface eth0",
        ),
        (
            "serial baud",
            "[node.alpha]",
            "[node.alpha]\n[[heartbeat.link]]\nkind = \"serial\"\nbaud = 1234\n[heartbeat.link.on.alpha]\ndevice = \"/dev/ttyS0\"",
            "heartbeat.link[0].baud",
        ),
        (
            "udp missing peer",
            "[node.alpha]",
            "[node.alpha]\n[[heartbeat.link]]\nkind = \"udp\"\n[heartbeat.link.on.alpha]\nbind = \"127.0.0.1:694\"",
            "heartbeat.link[0].on.alpha.peer",
        ),
        (
            "fence delay not a number",
            "[node.alpha]",
            "[node.alpha]\nfence_delay_ms = \"soon\"",
            "fence_delay_ms",
        ),
        (
            "negative fence delay",
            "[node.alpha]",
            "[node.alpha]\nfence_delay_ms = -5",
            "fence_delay_ms",
        ),
        (
            "no data threads",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\ndata_threads = 0",
            "cluster.data_threads",
        ),
        (
            "too many data threads",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\ndata_threads = 65",
            "cluster.data_threads",
        ),
        (
            "data threads not a number",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\ndata_threads = \"two\"",
            "data_threads",
        ),
        (
            "negative data threads",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\ndata_threads = -1",
            "data_threads",
        ),
        (
            "relative state dir",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\nstate_dir = \"var/lib/duet\"",
            "cluster.state_dir = var/lib/duet: must be an absolute path",
        ),
        (
            "group name with a space",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\nadmin_group = \"duet admins\"",
            "cluster.admin_group = duet admins: not a group name",
        ),
        (
            "read group not a string",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\nread_group = 7",
            "read_group",
        ),
        (
            "link encryption not a boolean",
            "metrics_listen = \"\"",
            "metrics_listen = \"\"\nlink_encryption = \"yes\"",
            "link_encryption",
        ),
        ("three nodes", "[node.alpha]", "[node.alpha]\n[node.beta]\n[node.gamma]", "node"),
        ("pair without secret", "[node.alpha]", "[node.alpha]\n[node.beta]", "cluster.secret_file"),
    ];
    for (what, from, to, key) in cases {
        assert!(SINGLE.contains(from), "{what}: base lacks {from:?}");
        let text = SINGLE.replacen(from, to, 1);
        let err = parse(&text).expect_err(what).to_string();
        assert!(err.contains(key), "{what}: {err:?} does not name {key:?}");
    }
}

#[test]
fn pair_needs_replication_addresses_and_distinct_ones() {
    let pair = SINGLE
        .replace("[node.alpha]", "[node.alpha]\n[node.beta]")
        .replace("configured_master", "secret_file = \"/etc/duet/secret\"\nconfigured_master")
        + "[resource.on.beta]\ndisk = \"/tmp/b.img\"\n";
    let e = parse(&pair).unwrap_err().to_string();
    assert!(e.contains("resource[0].on.alpha.replication_address"), "{e}");
    let with = pair
        .replace(
            "disk = \"/tmp/duet-test/vol0.img\"",
            "disk = \"/tmp/a.img\"\nreplication_address = \"127.0.0.1:7789\"",
        )
        .replace(
            "disk = \"/tmp/b.img\"",
            "disk = \"/tmp/b.img\"\nreplication_address = \"127.0.0.1:7789\"",
        );
    let e = parse(&with).unwrap_err().to_string();
    assert!(e.contains("same address"), "{e}");
    let ok = with.replacen("127.0.0.1:7789", "127.0.0.1:7790", 1);
    parse(&ok).unwrap();
}

#[test]
fn no_resource() {
    let text = &SINGLE[..SINGLE.find("[[resource]]").unwrap()];
    let e = parse(text).unwrap_err().to_string();
    assert!(e.starts_with("resource = []") && e.contains("add a [[resource]]"), "{e}");
}

#[test]
fn parse_errors_say_where() {
    let e = parse(&SINGLE.replace("name = \"vol0\"", "name = \"vol0\"\nbogus = 1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 12 (`bogus = 1`)") && e.contains("unknown field `bogus`"), "{e}");
}

#[test]
fn garbage_is_a_parse_error_not_a_panic() {
    for junk in ["", "\u{0}\u{1}", "[[[", "cluster = 5", "[cluster]\nname = 1"] {
        assert!(parse(junk).is_err(), "{junk:?}");
    }
}

#[test]
fn the_fence_delay_is_per_node_with_the_fencing_default() {
    let text = SINGLE.replacen(
        "[node.alpha]",
        "[node.alpha]\nfence_delay_ms = 3000\n[fencing]\ndelay_ms = 500",
        1,
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.fence_delay_ms("alpha"), 3000);
    assert_eq!(c.fence_delay_ms("nobody"), 500);
}

#[test]
fn typed_values_read_back_as_written() {
    let text = SINGLE.replacen(
        "[node.alpha]",
        "[node.alpha]\nmetrics_listen = \"[::1]:9641\"\n[[vip]]\ninterface = \"eth0\"\n\
         address = \"2001:db8::100/64\"\naliases = [\"192.0.2.7/32\"]\nmac = \"02:00:5e:00:01:0a\"",
        1,
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.metrics_listen("alpha"), Some("[::1]:9641".parse().unwrap()));
    let v = &c.vip[0];
    assert_eq!(v.address.to_string(), "2001:db8::100/64");
    assert_eq!(v.aliases[0].to_string(), "192.0.2.7/32");
    assert_eq!(v.mac.map(|m| m.to_string()).as_deref(), Some("02:00:5e:00:01:0a"));
    for bad in ["192.0.2.1/33", "::1/129", "192.0.2.1/", "/24", "x/8", "192.0.2.1/-1"] {
        assert!(bad.parse::<IpPrefix>().is_err(), "{bad}");
    }
    for bad in ["03:00:00:00:00:01", "02:00:00:00:00", "02:00:00:00:00:0g", "2:0:0:0:0:1"] {
        assert!(bad.parse::<Mac>().is_err(), "{bad}");
    }
    let off = SINGLE.replacen("[node.alpha]", "[node.alpha]\nmetrics_listen = \"\"", 1);
    assert_eq!(parse(&off).expect("valid").metrics_listen("alpha"), None);
}

/// The handshake fingerprint hashed the Debug text before these names existed: they must stay
/// equal, or a node of this release refuses a peer of the last one.
#[test]
fn fingerprint_names_are_the_earlier_releases() {
    for p in [Protocol::A, Protocol::B, Protocol::C] {
        assert_eq!(p.fingerprint_name(), format!("{p:?}"));
    }
    for d in [DataIntegrity::Off, DataIntegrity::Crc32, DataIntegrity::Sha256] {
        assert_eq!(d.fingerprint_name(), format!("{d:?}"));
    }
}

#[test]
fn hooks_are_typed_and_checked() {
    let ok = parse(&format!("{SINGLE}\n[hooks]\nsplit_brain = \"/bin/true\"\ntimeout_ms = 500\n"))
        .unwrap();
    assert_eq!((ok.hooks.split_brain.as_str(), ok.hooks.timeout_ms), ("/bin/true", 500));
    assert_eq!(parse(SINGLE).unwrap().hooks, Hooks::default());
    for (extra, want) in [
        ("[hooks]\ntimeout_ms = 0\n", "hooks.timeout_ms = 0"),
        ("[hooks]\nio_errror = \"x\"\n", "unknown field `io_errror`"),
        ("[hooks]\nsplit_brain = 7\n", "split_brain"),
        ("[hooks]\ntimeout_ms = -1\n", "timeout_ms"),
        ("hooks = \"yes\"\n", "hooks"),
    ] {
        let e = parse(&format!("{SINGLE}\n{extra}")).unwrap_err().to_string();
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

#[test]
fn health_groups_fail_as_their_require_says() {
    let text = format!(
        "{SINGLE}\n[[health.group]]\nname = \"wan\"\nrequire = \"all\"\n[[health.group]]\nname = \"lan\"\n\
[[health.check]]\nname = \"r1\"\nkind = \"ping\"\ntarget = \"192.0.2.1\"\ngroup = \"wan\"\n\
[[health.check]]\nname = \"r2\"\nkind = \"ping\"\ntarget = \"2001:db8::1\"\ngroup = \"wan\"\n\
[[health.check]]\nname = \"nic\"\nkind = \"interface\"\ntarget = \"eth0\"\ngroup = \"lan\"\n\
[[health.check]]\nname = \"disk\"\nkind = \"script\"\ntarget = \"true\"\n"
    );
    let h = parse(&text).unwrap().health;
    assert_eq!(h.group[0].require, ha::Require::All);
    assert_eq!(h.group[1].require, ha::Require::Any, "the default");
    // (r1, r2, nic, disk) → healthy
    for (ok, want) in [
        ([true, true, true, true], true),
        ([false, true, true, true], true), // one uplink of an "all" group down: holds
        ([true, false, true, true], true),
        ([false, false, true, true], false), // every uplink down
        ([true, true, false, true], false),  // the "any" group's only check
        ([true, true, true, false], false),  // a check in no group counts alone
    ] {
        assert_eq!(h.healthy(&ok), want, "{ok:?}");
    }
    assert!(ha::Health::default().healthy(&[]));
}

#[test]
fn on_io_error_takes_its_three_values_and_names_them_otherwise() {
    let with = |v: &str| {
        parse(
            &SINGLE
                .replace("[resource.on.alpha]", &format!("on_io_error = {v}\n[resource.on.alpha]")),
        )
    };
    assert_eq!(with("\"freeze\"").unwrap().resource[0].on_io_error, OnIoError::Freeze);
    assert_eq!(with("\"pass\"").unwrap().resource[0].on_io_error, OnIoError::Pass);
    for bad in ["\"sometimes\"", "1", "\"Freeze\""] {
        let e = with(bad).unwrap_err().to_string();
        assert!(e.contains("on_io_error") || e.contains("detach"), "{bad}: {e}");
    }
}

#[test]
fn scheduled_sync_needs_a_schedule_a_peer_and_a_schedule_that_parses() {
    let pair = &include_str!("../../../duet.example.toml").replacen("sync = \"continuous\"", "", 1);
    let with = |text: &str, lines: &str| {
        parse(&text.replacen("[resource.on.alpha]", &format!("{lines}\n[resource.on.alpha]"), 1))
    };
    let c = with(pair, "sync = \"scheduled\"\nschedule = \"daily 02:00\"").unwrap();
    assert_eq!(c.resource[0].sync, SyncMode::Scheduled);
    assert_eq!(c.resource[0].schedule().map(|s| s.to_string()).as_deref(), Some("daily 02:00"));
    assert_eq!(parse(pair).unwrap().resource[0].schedule(), None, "continuous by default");
    for (lines, key, says) in [
        ("sync = \"scheduled\"", "resource[0].schedule", "missing"),
        (
            "sync = \"scheduled\"\nschedule = \"sometimes\"",
            "resource[0].schedule",
            "not a schedule",
        ),
        ("sync = \"scheduled\"\nschedule = \"daily 25:00\"", "resource[0].schedule", "23:59"),
        ("schedule = \"hourly\"", "resource[0].schedule", "needs sync = \"scheduled\""),
    ] {
        let e = with(pair, lines).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(says), "{lines}: {e}");
    }
    for lines in ["sync = \"weekly\"", "sync = 1", "sync = \"Scheduled\"", "schedule = 5"] {
        let e = with(pair, lines).unwrap_err().to_string();
        assert!(e.contains("sync") || e.contains("schedule"), "{lines}: {e}");
    }
    let e = with(SINGLE, "sync = \"scheduled\"\nschedule = \"hourly\"").unwrap_err().to_string();
    assert!(e.contains("resource[0].sync") && e.contains("needs a peer"), "{e}");
}
