//! One suite, run against both engines (the macro at the bottom instantiates it per engine).

use super::*;

fn open(kind: EngineKind, size: u64, direct: bool) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    File::create(&path).unwrap().set_len(size).unwrap();
    let store =
        Store::open(&path, StoreOptions { engine: kind, direct, read_only: false }).unwrap();
    (dir, store)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8).collect()
}

async fn write_read_many(kind: EngineKind) {
    let (_d, store) = open(kind, 64 << 20, false);
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    // 600 concurrent writes: more than the ring depth, so the backlog path runs too.
    for i in 0..600u64 {
        let s = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let len = 4096 + (i as usize % 3) * 1000;
            s.write(i * 65536 + 7, IoBuf::from_slice(&pattern(i, len)), i % 5 == 0).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    store.flush().await.unwrap();
    for i in 0..600u64 {
        let len = 4096 + (i as usize % 3) * 1000;
        let got = store.read(i * 65536 + 7, len).await.unwrap();
        assert_eq!(&got[..], &pattern(i, len)[..], "block {i}");
    }
    // And the bytes really are in the file, not only in our buffers.
    let raw = std::fs::read(store.path()).unwrap();
    assert_eq!(&raw[65536 + 7..65536 + 7 + 4096], &pattern(1, 4096)[..]);
}

async fn large_io(kind: EngineKind) {
    let (_d, store) = open(kind, 64 << 20, false);
    let data = pattern(9, 32 << 20);
    store.write(1 << 20, IoBuf::from_slice(&data), true).await.unwrap();
    assert_eq!(&store.read(1 << 20, 32 << 20).await.unwrap()[..], &data[..]);
}

async fn trim_and_zeroes(kind: EngineKind) {
    let (_d, store) = open(kind, 8 << 20, false);
    let ones = vec![1u8; 4 << 20];
    store.write(0, IoBuf::from_slice(&ones), false).await.unwrap();
    let all = store.block_status(0, 8 << 20, 100).await.unwrap();
    assert_eq!(all[0].flags, 0, "written data is data: {all:?}");
    assert_eq!(all[0].len, 4 << 20);
    assert_eq!(all[1].flags, STATE_HOLE | STATE_ZERO);

    store.trim(0, 1 << 20, false).await.unwrap();
    assert!(store.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
    let st = store.block_status(0, 2 << 20, 100).await.unwrap();
    assert_eq!(st[0], Extent { len: 1 << 20, flags: STATE_HOLE | STATE_ZERO });
    assert_eq!(st[1].flags, 0);

    store.write_zeroes(1 << 20, 1 << 20, true, false, false).await.unwrap();
    assert!(store.read(1 << 20, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
    store.write_zeroes(2 << 20, 4096, false, true, true).await.unwrap();
    assert!(store.read(2 << 20, 8192).await.unwrap()[..4096].iter().all(|&b| b == 0));
    assert_eq!(store.read(2 << 20, 8192).await.unwrap()[4096], 1, "neighbours untouched");

    // REQ_ONE-style query returns exactly one extent, never more than asked.
    let one = store.block_status(0, 3 << 20, 1).await.unwrap();
    assert_eq!(one.len(), 1);
    assert!(u64::from(one[0].len) <= 3 << 20);
}

async fn direct_io(kind: EngineKind) {
    let (_d, store) = open(kind, 16 << 20, true);
    assert_eq!(store.min_block(), 4096);
    let data = pattern(3, 1 << 20);
    store.write(8192, IoBuf::from_slice(&data), false).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(&store.read(8192, 1 << 20).await.unwrap()[..], &data[..]);
}

async fn errors_are_errnos(kind: EngineKind) {
    let (_d, store) = open(kind, 1 << 20, false);
    // The file shrinks under us: reading past the new end is an I/O error, not garbage.
    std::fs::OpenOptions::new().write(true).open(store.path()).unwrap().set_len(4096).unwrap();
    assert_eq!(store.read(8192, 4096).await.unwrap_err(), Errno::EIO);
}

macro_rules! suite {
    ($m:ident, $kind:expr) => {
        mod $m {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn write_read_many() {
                super::write_read_many($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_io() {
                super::large_io($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trim_and_zeroes() {
                super::trim_and_zeroes($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn direct_io() {
                super::direct_io($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn errors_are_errnos() {
                super::errors_are_errnos($kind).await
            }
        }
    };
}

suite!(uring, EngineKind::Uring);
suite!(threads, EngineKind::Threads);

#[test]
fn open_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { engine: EngineKind::Threads, direct: false, read_only: false };
    let missing = dir.path().join("missing.img");
    let e = Store::open(&missing, opts).unwrap_err().to_string();
    assert!(e.contains("missing.img") && e.contains("No such file"), "{e}");
    let e = Store::open(Path::new("/dev/null"), opts).unwrap_err().to_string();
    assert!(e.contains("neither a regular file"), "{e}");
    let e = Store::open(dir.path(), opts).unwrap_err().to_string();
    assert!(e.contains("Is a directory"), "{e}");
    let empty = dir.path().join("empty.img");
    File::create(&empty).unwrap();
    assert!(Store::open(&empty, opts).unwrap_err().to_string().contains("is empty"));
    let odd = dir.path().join("odd.img");
    File::create(&odd).unwrap().set_len(5000).unwrap();
    let e = Store::open(&odd, StoreOptions { direct: true, ..opts }).unwrap_err().to_string();
    assert!(e.contains("multiple of 4096"), "{e}");
}

#[tokio::test]
async fn auto_picks_uring_here() {
    let (_d, store) = open(EngineKind::Auto, 1 << 20, false);
    assert_eq!(store.engine_name(), "uring", "io_uring works on this kernel and is the default");
}

#[test]
fn uring_outside_a_runtime_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    File::create(&path).unwrap().set_len(4096).unwrap();
    let opts = StoreOptions { engine: EngineKind::Uring, direct: false, read_only: false };
    let e = Store::open(&path, opts).unwrap_err().to_string();
    assert!(e.contains("needs a tokio runtime"), "{e}");
}

#[test]
fn a_slow_inline_write_closes_the_gate_for_the_backoff_only() {
    let t0 = Instant::now();
    let g = InlineGate::new(t0);
    assert!(g.open_at(t0));
    // Fast writes keep it open, however many.
    for i in 0..100 {
        assert!(!g.record(t0 + Duration::from_millis(i), SLOW_INLINE));
    }
    assert!(g.open_at(t0 + Duration::from_millis(100)));
    assert_eq!(g.closings(), 0);
    // One slow write: closed from its end for the backoff, open after.
    let start = t0 + Duration::from_secs(5);
    let took = SLOW_INLINE + Duration::from_millis(30);
    assert!(g.record(start, took));
    assert_eq!(g.closings(), 1);
    let end = start + took;
    assert!(!g.open_at(end));
    assert!(!g.open_at(end + INLINE_BACKOFF - Duration::from_millis(1)));
    assert!(g.open_at(end + INLINE_BACKOFF));
    // A time before `born` (a clock read racing the constructor) counts as the start.
    let late = InlineGate::new(t0 + Duration::from_secs(1));
    assert!(late.open_at(t0));
}

#[test]
fn writes_inline_only_buffered_small_non_fua() {
    let (_d, store) = open(EngineKind::Threads, 4 << 20, false);
    assert!(store.writes_inline(4096, false));
    assert!(store.writes_inline(INLINE_MAX, false));
    assert!(!store.writes_inline(INLINE_MAX + 1, false));
    assert!(!store.writes_inline(4096, true));
    let (_d2, direct) = open(EngineKind::Threads, 4 << 20, true);
    assert!(!direct.writes_inline(4096, false));
    // While the engine has a write of this store in flight, an inline one would queue behind it.
    {
        let _q = Queued::new(&store.engine_writes);
        assert!(!store.writes_inline(4096, false));
    }
    assert!(store.writes_inline(4096, false));
    // After a slow one, nothing goes inline for a while.
    assert!(store.inline.record(Instant::now(), SLOW_INLINE * 2));
    assert!(!store.writes_inline(4096, false));
    assert_eq!(store.slow_inline_writes(), 1);
}
