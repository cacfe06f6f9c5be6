//! The resync as target (requests at the controller's rate, the end of the resync) and online
//! verify.

use super::*;
use frames::hashes;

/// The resync as target: request out-of-sync blocks at the controller's rate until none are left.
pub(super) async fn resync_target(vol: Arc<Volume>, peer: Arc<Peer>, inflight: Arc<AtomicU64>) {
    let cfg = vol.config().expect("replicated").clone();
    // (A scheduled resource ran it in the handshake, before anything reached its disk.)
    if let Some(hook) = vol.before_resync_target().filter(|_| vol.scheduled().is_none()) {
        // Nothing is requested until it is done (a snapshot of the old data, say); the session
        // stays up meanwhile, and the source only waits for requests.
        if let Err(why) = (hook.0)().await {
            vol.event(format!(
                "before_resync_target hook failed: {why}; dropping the connection (the resync starts again at the next one)"
            ));
            peer.tx.close();
            return;
        }
    }
    let mut settings = vol.watch_resync_settings();
    let mut ctl = RateController::new(settings.borrow_and_update().unwrap_or(cfg.resync));
    let g = vol.with_core(|c| c.r.bitmap.granularity());
    // A target bigger than its source gets what the source has: the blocks past the source's
    // size exist on neither side's replicated volume, so they are not asked for, and their
    // bits go (the handshake refuses the other way round: a target smaller than its source).
    let end = vol.with_core(|c| {
        let end = c.r.peer_size.map_or(vol.size(), |p| p.min(vol.size()));
        // From the first whole block past it: a block the source's end cuts is still asked for.
        let cut = end.next_multiple_of(g);
        if cut < vol.size() {
            c.r.resync_applied(cut, vol.size() - cut);
        }
        end
    });
    let mut cursor = 0u64;
    let mut tick = tokio::time::interval(TICK);
    let mut budget = 0u64;
    loop {
        // Each tick grants a budget; completions wake us to spend what is left of it, so the
        // in-flight window refills at once instead of once per tick.
        tokio::select! {
            _ = tick.tick() => {
                if vol.with_core(|c| c.r.st.conn) != ConnState::SyncTarget {
                    return;
                }
                if settings.has_changed().unwrap_or(false)
                    && let Some(s) = *settings.borrow_and_update()
                {
                    ctl.adjust(s);
                    vol.event(format!(
                        "resync rate adjusted: rate_kib {}, min_rate_kib {}, max_rate_kib {}",
                        s.rate_kib, s.min_rate_kib, s.max_rate_kib
                    ));
                }
                // Up to one request's worth carries over (so a budget just short of a whole
                // request is not lost every tick); the rest was granted, not asked for, and is
                // not in flight.
                let carry = budget.min(rs_chunk(g) / 1024);
                ctl.unused(budget - carry);
                let acked = vol.resync_acked.swap(0, Relaxed) / 1024;
                let busy = vol.app_writes.swap(0, Relaxed) > 0;
                budget = carry + ctl.tick(Instant::now(), acked, busy);
            }
            _ = vol.resync_wake.notified() => {}
        }
        loop {
            if inflight.load(Relaxed) >= RS_MAX_INFLIGHT {
                break;
            }
            let next = vol.with_core(|c| {
                c.r.bitmap.next_set(cursor).map(|s| (s, c.r.bitmap.run_end(s, rs_chunk(g) / g)))
            });
            let Some((s, e)) = next else { break };
            let (off, len) = (s * g, ((e - s) * g).min(vol.size() - s * g));
            // (Bits past `end` were cleared above; one marked there since, by a failed write,
            // has no source either.)
            if off >= end {
                vol.with_core(|c| c.r.resync_applied(off, vol.size() - off));
                break;
            }
            let len = len.min(end - off);
            let kib = len.div_ceil(1024);
            if kib > budget {
                break;
            }
            budget -= kib;
            cursor = e;
            let mut payload = BytesMut::new();
            payload.put_u32(u32::try_from(len).expect("bounded"));
            if cfg.checksum_resync
                && let Ok(buf) = vol.read(off, usize::try_from(len).expect("bounded")).await
            {
                payload.put_slice(&wire::hash(&buf));
            }
            inflight.fetch_add(1, Relaxed);
            if !peer.send(small_frame(Kind::RsRequest, 0, 0, off, &payload)).await {
                return;
            }
        }
        let done = vol.with_core(|c| c.r.bitmap.next_set(cursor).is_none());
        if done && inflight.load(Relaxed) == 0 {
            if vol.with_core(|c| c.r.bitmap.weight()) > 0 {
                cursor = 0; // blocks marked again meanwhile (failed writes): another pass
                continue;
            }
            finish_target(&vol, &peer).await;
            return;
        }
    }
}

async fn finish_target(vol: &Arc<Volume>, peer: &Arc<Peer>) {
    // The resynced blocks are durable before this node calls itself UpToDate on disk and the
    // source forgets them.
    if let Err(e) = vol.store().flush().await {
        tracing::error!(error = %e, "flush at the end of the resync failed; dropping the link");
        peer.tx.close();
        return;
    }
    let p = vol.with_core(|c| {
        c.resync = None;
        c.r.target_done()
    });
    // (Refused only when the connection changed meanwhile: the teardown takes over.)
    let Ok(p) = p else { return };
    let _ = vol.persist(p).await;
    vol.mark_in_sync();
    vol.drop_kept_state();
    peer.send(small_frame(Kind::RsDone, 0, 0, 0, &[])).await;
    vol.event("resync finished (target): this node is UpToDate".into());
    vol.send_state().await;
    vol.notify();
}

/// `duet verify [--repair]`: compares every block's hash with the peer's. Runs in the
/// background; progress and findings show in `duet status`.
pub fn verify(vol: &Arc<Volume>, repair: bool) -> Result<String, crate::repl::volume::Refused> {
    let peer = vol.with_core(|c| {
        c.r.st.step(Event::VerifyStart)?;
        c.verify = Some(crate::repl::volume::Run::new(vol.size(), Instant::now()));
        c.verify_found.clear();
        Ok::<_, engine::state::Refusal>(c.peer.clone())
    })?;
    let Some(peer) = peer else { return Err(crate::repl::volume::Refused("not connected".into())) };
    vol.event(format!("online verify started{}", if repair { " (with repair)" } else { "" }));
    vol.notify();
    let v = Arc::clone(vol);
    tokio::spawn(async move { run_verify(v, peer, repair).await });
    Ok("verify started; watch `duet status`".into())
}

async fn run_verify(vol: Arc<Volume>, peer: Arc<Peer>, repair: bool) {
    let g = vol.with_core(|c| c.r.bitmap.granularity());
    let digest = vol.config().expect("replicated").digest;
    let mut off = 0u64;
    let mut found: Vec<(u64, u64)> = Vec::new();
    let size = vol.size();
    while off < size {
        if vol.with_core(|c| c.r.st.conn) != ConnState::VerifySource {
            vol.event("verify stopped: the connection changed".into());
            return;
        }
        let len = VERIFY_CHUNK.min(size - off);
        let n = usize::try_from(len).expect("bounded");
        let (tx, rx) = oneshot::channel();
        let id = peer.next_verify.fetch_add(1, Relaxed);
        if let Ok(mut m) = peer.verify.lock() {
            m.insert(id, tx);
        }
        let lock = vol.lock_range(off, len).await;
        let local = vol.read(off, n).await;
        let sent = peer
            .send(small_frame(
                Kind::VerifyRequest,
                0,
                id,
                off,
                &u32::try_from(len).expect("bounded").to_be_bytes(),
            ))
            .await;
        drop(lock);
        let (Ok(local), true) = (local, sent) else { break };
        let Ok(theirs) = rx.await else { break };
        let mine = hashes(&local, g);
        if theirs.len() != mine.len() {
            tracing::error!("verify reply of the wrong length at {off}");
            break;
        }
        for (i, (a, b)) in mine.chunks(32).zip(theirs.chunks(32)).enumerate() {
            if a != b {
                let bo = off + i as u64 * g;
                let bl = g.min(size - bo);
                match found.last_mut() {
                    Some((o, l)) if *o + *l == bo => *l += bl,
                    _ => found.push((bo, bl)),
                }
                vol.stats.verify_mismatch_bytes.fetch_add(bl, Relaxed);
                vol.with_core(|c| c.r.bitmap.set_range(bo, bl));
                let mut p = BytesMut::new();
                p.put_u64(bl);
                peer.send(small_frame(Kind::OutOfSync, 0, 0, bo, &p)).await;
            }
        }
        off += len;
        vol.with_core(|c| {
            if let Some(v) = c.verify.as_mut() {
                v.set_done(off, Instant::now());
            }
            c.verify_found = found.clone();
        });
    }
    peer.send(small_frame(Kind::VerifyDone, 0, 0, 0, &[])).await;
    let total: u64 = found.iter().map(|r| r.1).sum();
    vol.event(format!("online verify finished: {} out-of-sync ranges, {total} bytes", found.len()));
    if repair && !found.is_empty() {
        // The Primary's data wins; with no Primary, the node that ran verify.
        let peer_primary = vol.with_core(|c| c.r.st.peer_role == Some(Role::Primary));
        let chunk = rs_chunk(g);
        let pieces = found.iter().flat_map(|&(o, l)| {
            (0..l.div_ceil(chunk)).map(move |i| (o + i * chunk, chunk.min(l - i * chunk)))
        });
        for (o, l) in pieces {
            if peer_primary {
                let mut p = BytesMut::new();
                p.put_u32(u32::try_from(l).expect("one chunk"));
                peer.send(small_frame(Kind::RsRequest, 0, 0, o, &p)).await;
            } else {
                let lock = vol.lock_range(o, l).await;
                if let Ok(buf) = vol.read(o, usize::try_from(l).expect("bounded")).await {
                    peer.send(block_frame(Kind::RsData, 0, 0, o, buf, digest)).await;
                    vol.stats.resync_sent_bytes.fetch_add(l, Relaxed);
                    vol.with_core(|c| c.r.bitmap.clear_range(o, l));
                }
                drop(lock);
            }
        }
        vol.event(format!(
            "verify repair: {total} bytes resynced ({})",
            if peer_primary { "from the Primary peer" } else { "from this node" }
        ));
    }
    vol.with_core(|c| {
        let _ = c.r.st.step(Event::VerifyEnd);
        c.verify = None;
    });
    vol.notify();
}
