//! A client that writes 64 KiB blocks one at a time through NBD, reconnecting (to whoever
//! serves the address) when the connection drops, and records which writes were acknowledged;
//! and the check that every acknowledged write is readable afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::rawnbd::Raw;
use integration::{random_bytes, wait_until};
use replicator::nbd::proto::{CMD_READ, CMD_WRITE};

const BLOCK: u64 = 65536;
/// The write log's region starts here (fio uses the first 16 MiB).
const LOG_BASE: u64 = 32 << 20;
const LOG_BLOCKS: u64 = 800;

/// A client that writes 64 KiB blocks one at a time through NBD, reconnecting (to whoever
/// serves the port) when the connection drops, and records which writes were acknowledged.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(port: u16, seed: u64) -> Self {
        Self::start_to(SocketAddr::from(([127, 0, 0, 1], port)), seed, || {})
    }

    /// Writes to `addr` from a thread that first runs `setup` (e.g. entering a namespace).
    pub fn start_to(addr: SocketAddr, seed: u64, setup: impl FnOnce() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (st, ak) = (Arc::clone(&stop), Arc::clone(&acked));
        let thread = std::thread::spawn(move || {
            setup();
            let mut conn: Option<Raw> = None;
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                let Some(c) = conn.as_mut() else {
                    conn = Raw::try_transmission_to(addr);
                    if conn.is_none() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    continue;
                };
                let block = i % LOG_BLOCKS;
                let data = random_bytes(seed + i, BLOCK as usize);
                let ok = c
                    .request(CMD_WRITE, 0, i, LOG_BASE + block * BLOCK, BLOCK as u32, &data)
                    .is_ok()
                    && c.reply().is_ok_and(|r| r.error == 0);
                if ok {
                    ak.lock().unwrap().push(i);
                    i += 1;
                } else {
                    // Not acknowledged: the same write goes again on a new connection.
                    conn = None;
                }
            }
        });
        Self { stop, acked, thread: Some(thread) }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub fn wait_more(&self, n: usize, limit: Duration) -> bool {
        let target = self.count() + n;
        wait_until(limit, || self.count() >= target)
    }

    /// Stops and returns the acknowledged write numbers.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

/// Every acknowledged write is readable through `port`: for each block, the last acknowledged
/// write to it.
pub fn check_log(port: u16, seed: u64, acked: &[u64]) {
    check_log_with(|| Raw::transmission(port), seed, acked);
}

/// [`check_log`] over a connection `connect` makes.
pub fn check_log_with(connect: impl FnOnce() -> Raw, seed: u64, acked: &[u64]) {
    let mut last = std::collections::BTreeMap::new();
    for &i in acked {
        last.insert(i % LOG_BLOCKS, i);
    }
    let mut r = connect();
    for (&block, &i) in &last {
        r.request(CMD_READ, 0, i, LOG_BASE + block * BLOCK, BLOCK as u32, &[]).unwrap();
        assert_eq!(r.reply().unwrap().error, 0);
        // The writer may have sent a later write to this block that was never acknowledged
        // (in flight at the crash): either content is legitimate then, but it must be one of them.
        let got = r.read_data(BLOCK as usize);
        let want = random_bytes(seed + i, BLOCK as usize);
        let next = random_bytes(seed + i + LOG_BLOCKS, BLOCK as usize);
        assert!(got == want || got == next, "acknowledged write {i} (block {block}) lost");
    }
}
