//! The heartbeat link tasks: one writer and one reader per link (UDP or serial), feeding
//! the loop's inbox.

use super::*;

/// Counters of one link.
#[derive(Debug, Default)]
pub(super) struct LinkCounters {
    pub(super) frames_in: AtomicU64,
    pub(super) frames_out: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) send_errors: AtomicU64,
    pub(super) garbage_bytes: AtomicU64,
}

pub(super) enum Transport {
    Udp(Arc<UdpLink>),
    Serial(Arc<SerialPort>),
}

pub(super) struct Link {
    pub(super) name: String,
    pub(super) out: mpsc::Sender<Vec<u8>>,
    pub(super) counters: Arc<LinkCounters>,
}

pub(super) fn spawn_link(
    i: usize,
    t: Transport,
    mut out: mpsc::Receiver<Vec<u8>>,
    inbox: mpsc::Sender<(usize, Vec<u8>)>,
    c: Arc<LinkCounters>,
    keepalive: Duration,
    sd: watch::Receiver<bool>,
) {
    match t {
        Transport::Udp(u) => {
            let u2 = Arc::clone(&u);
            let c2 = Arc::clone(&c);
            tokio::spawn(async move {
                while let Some(b) = out.recv().await {
                    match u2.send(&b).await {
                        Ok(()) => c2.frames_out.fetch_add(1, Relaxed),
                        Err(_) => c2.send_errors.fetch_add(1, Relaxed),
                    };
                }
            });
            let mut sd = sd;
            tokio::spawn(async move {
                let mut buf = Box::new([0u8; frame::MAX_FRAME + 1]);
                loop {
                    tokio::select! {
                        r = u.recv(&mut buf) => match r {
                            Ok((n, _)) => {
                                if inbox.send((i, buf[..n].to_vec())).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        },
                        _ = stopped(&mut sd) => return,
                    }
                }
            });
        }
        Transport::Serial(p) => {
            let p2 = Arc::clone(&p);
            let c2 = Arc::clone(&c);
            tokio::spawn(async move {
                while let Some(b) = out.recv().await {
                    match p2.write_all(&wrap(&b), keepalive).await {
                        Ok(()) => c2.frames_out.fetch_add(1, Relaxed),
                        Err(_) => c2.send_errors.fetch_add(1, Relaxed),
                    };
                }
            });
            let mut sd = sd;
            tokio::spawn(async move {
                let mut d = Deframer::default();
                let mut buf = vec![0u8; 4096];
                loop {
                    tokio::select! {
                        r = p.read(&mut buf) => match r {
                            Ok(0) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            Ok(n) => {
                                d.push(&buf[..n]);
                                while let Some(f) = d.next_frame() {
                                    if inbox.send((i, f)).await.is_err() {
                                        return;
                                    }
                                }
                                c.garbage_bytes.store(d.garbage_bytes, Relaxed);
                            }
                        },
                        _ = stopped(&mut sd) => return,
                    }
                }
            });
        }
    }
}
