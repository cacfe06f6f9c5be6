//! Acceptance 1 and 2: real NBD clients (nbdinfo, qemu-io, fio with verify, nbdcopy, nbdfuse +
//! loop + ext4) against a running daemon, once per I/O engine.

use std::process::Command;
use std::time::Duration;

use integration::{Node, NodeOpts, have, is_root, qemu_io, random_bytes, run, run_ok};

const MIN: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);

fn node(engine: &'static str) -> Node {
    Node::start(&NodeOpts { engine, ..NodeOpts::default() })
}

fn nbdinfo_shows_size_and_flags(engine: &'static str) {
    if !have("nbdinfo") {
        return;
    }
    let n = node(engine);
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(n.uri()), MIN);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol0");
    assert_eq!(e["export-size"], 256u64 << 20);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_maximum"], 32u64 << 20);
    assert!(out.contains("base:allocation"), "{out}");
    assert_eq!(v["protocol"], "newstyle-fixed");
    // LIST shows the export by name.
    let list = run_ok(
        Command::new("nbdinfo").arg("--list").arg(format!("nbd://127.0.0.1:{}", n.port)),
        MIN,
    );
    assert!(list.contains("export=\"vol0\""), "{list}");
    // The map: a fresh sparse file is one hole.
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(n.uri()), MIN);
    assert!(map.contains("hole,zero"), "{map}");
    assert_eq!(
        n.status()["resources"][0]["io_engine"],
        if engine == "threads" { "threads" } else { "uring" }
    );
}

fn qemu_io_patterns(engine: &'static str) {
    if !have("qemu-io") {
        return;
    }
    let n = node(engine);
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0x5a 1M 64k",
        "write -z 2M 1M",
        "read -P 0 2M 1M",
        "write -P 0x33 4M 512k",
        "discard 4M 256k",
        "read -P 0x33 4352k 256k",
        "aio_write -P 0x11 8M 64k",
        "aio_write -P 0x22 9M 64k",
        "aio_flush",
        "read -P 0x11 8M 64k",
        "read -P 0x22 9M 64k",
        "write -f -P 0x44 10M 4k",
        "read -P 0x44 10M 4k",
        "flush",
        "read -P 0x5a 1M 64k",
    ];
    let out = qemu_io(&n.uri(), &cmds);
    assert!(!out.to_lowercase().contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");
    // The data really is in the backing file.
    let raw = std::fs::read(&n.disk).expect("disk");
    assert!(raw[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(raw[10 << 20..(10 << 20) + 4096].iter().all(|&b| b == 0x44));
    let st = n.status();
    let s = &st["resources"][0]["stats"];
    assert!(s["writes"].as_u64().unwrap() >= 6 && s["flushes"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["request_errors"], 0, "{s}");
}

fn fio_verify(n: &Node, rw: &str, bs: &str, iodepth: u32, jobs: u32) {
    let out = run(
        Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", n.uri()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            &format!("--numjobs={jobs}"),
            "--size=48M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        LONG,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let json = &text[text.find('{').expect("fio JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let jobs_v = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs_v.len(), jobs as usize);
    for j in jobs_v {
        assert_eq!(j["error"], 0, "{j}");
        assert!(j["write"]["io_bytes"].as_u64().unwrap() >= 48 << 20, "wrote everything: {j}");
        assert!(j["read"]["io_bytes"].as_u64().unwrap() >= 48 << 20, "verified everything: {j}");
    }
}

fn fio_random_and_sequential(engine: &'static str) {
    if !have("fio") {
        return;
    }
    let n = node(engine);
    fio_verify(&n, "randwrite", "4k", 32, 1);
    fio_verify(&n, "write", "1m", 16, 1);
    // Several connections at once (the export advertises multi-conn).
    fio_verify(&n, "randwrite", "16k", 16, 3);
    assert!(n.status()["resources"][0]["stats"]["clients_total"].as_u64().unwrap() >= 5);
}

fn nbdcopy_round_trip(engine: &'static str) {
    if !have("nbdcopy") {
        return;
    }
    let n = node(engine);
    let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let mut data = random_bytes(42, 64 << 20);
    // A zero stretch exercises the sparse paths (zero requests, block status holes).
    data[8 << 20..16 << 20].fill(0);
    std::fs::write(&src, &data).expect("src");
    run_ok(Command::new("nbdcopy").arg(&src).arg(n.uri()), LONG);
    std::fs::File::create(&back).and_then(|f| f.set_len(256 << 20)).expect("back");
    run_ok(Command::new("nbdcopy").arg(n.uri()).arg(&back), LONG);
    let got = std::fs::read(&back).expect("back");
    assert!(got[..data.len()] == data[..], "image differs after a round trip");
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

fn ext4_via_nbdfuse_and_loop(engine: &'static str) {
    if !is_root("loop devices and mounts") || !have("nbdfuse") || !have("mkfs.ext4") {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is missing");
        return;
    }
    let n = node(engine);
    let st = integration::FuseDisk::attach(n.dir.path(), &n.uri(), None);
    let (dev, mnt) = (st.lo.clone(), st.mnt.clone());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]), LONG);
    run_ok(Command::new("mount").arg(&dev).arg(&mnt), MIN);
    let mut sums = Vec::new();
    for i in 0..8u64 {
        let data = random_bytes(i + 1, (1 << 20) * (i as usize + 1));
        std::fs::write(mnt.join(format!("f{i}")), &data).expect("write file");
        sums.push(data);
    }
    run_ok(&mut Command::new("sync"), MIN);
    run_ok(Command::new("umount").arg(&mnt), MIN);
    let fsck = run(Command::new("e2fsck").args(["-fn", &dev]), LONG);
    assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    run_ok(Command::new("mount").arg(&dev).arg(&mnt), MIN);
    for (i, want) in sums.iter().enumerate() {
        let got = std::fs::read(mnt.join(format!("f{i}"))).expect("read back");
        assert!(got == *want, "file f{i} differs after remount");
    }
    drop(st);
}

macro_rules! per_engine {
    ($($t:ident),*) => {
        mod uring { $( #[test] fn $t() { super::$t("auto") } )* }
        mod threads { $( #[test] fn $t() { super::$t("threads") } )* }
    };
}

per_engine!(
    nbdinfo_shows_size_and_flags,
    qemu_io_patterns,
    fio_random_and_sequential,
    nbdcopy_round_trip,
    ext4_via_nbdfuse_and_loop
);

#[test]
fn direct_io_serves_real_clients() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let n = Node::start(&NodeOpts { direct: true, ..NodeOpts::default() });
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(n.uri()), MIN);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["exports"][0]["block_size_minimum"], 4096);
    // qemu honours the minimum block size: its unaligned write becomes read-modify-write.
    qemu_io(
        &n.uri(),
        &[
            "write -P 0x7 4096 8192",
            "write -P 0x9 100 50",
            "read -P 0x9 100 50",
            "read -P 0x7 4096 8192",
        ],
    );
    assert_eq!(n.status()["resources"][0]["direct_io"], true);
}
