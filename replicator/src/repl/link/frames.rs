//! What each frame from the peer does in a live session.

use super::*;
use resync::resync_target;

impl Session {
    /// Handles one frame; `Ok(Some(reason))` ends the session in order.
    pub(super) async fn handle(&mut self, h: Header, p: BytesMut) -> Res<Option<String>> {
        let vol = Arc::clone(&self.vol);
        let digest = vol.config().expect("replicated").digest;
        match h.kind {
            // Answered in order, under the batch's cork: no task per ping.
            Kind::Ping => {
                self.peer.send(small_frame(Kind::PingAck, 0, 0, 0, &[])).await;
            }
            Kind::PingAck => {}
            Kind::Data | Kind::Zero => {
                vol.with_core(|c| c.r.check_replicated_write())?;
                let (data, len) = if h.kind == Kind::Zero {
                    (None, u32_payload(Kind::Zero, &p)?)
                } else {
                    self.block_payload(&h, &p, digest)?
                };
                range_of(&vol, h.offset, len)?;
                let lock = vol.lock_range(h.offset, len).await;
                let bar = Arc::clone(&self.barrier).read_owned().await;
                if cfg_protocol(&vol) == crate::repl::completion::Protocol::B {
                    self.peer.send(small_frame(Kind::RecvAck, 0, h.id, 0, &[])).await;
                }
                vol.app_writes.fetch_add(1, Relaxed);
                if h.kind == Kind::Data {
                    vol.stats.received_data_bytes.fetch_add(len, Relaxed);
                }
                let peer = Arc::clone(&self.peer);
                let fua = h.flags & F_FUA != 0;
                match data {
                    // A page-cache copy: done here, before the next frame is read (no task, no
                    // thread hand-over); its acknowledgement leaves with the batch's others.
                    Some(d) if vol.store().writes_inline(d.len(), fua) => {
                        let r = vol.store().write_now(h.offset, d);
                        drop((lock, bar));
                        acknowledge(&vol, &peer, &h, len, r).await;
                    }
                    data => {
                        let kib = u32::try_from(len.div_ceil(1024))
                            .map_or(APPLY_ROOM_KIB, |k| k.min(APPLY_ROOM_KIB));
                        let room = Arc::clone(&self.apply_room)
                            .acquire_many_owned(kib)
                            .await
                            .map_err(|_| LinkError::ApplyRoomClosed)?;
                        let data = data.map(IoBuf::from_slice);
                        tokio::spawn(async move {
                            let r = vol.apply_write(h.offset, data, len, h.flags).await;
                            drop((lock, bar, room));
                            acknowledge(&vol, &peer, &h, len, r).await;
                        });
                    }
                }
            }
            Kind::Flush => {
                let before = std::mem::replace(&mut self.barrier, Arc::new(RwLock::new(())));
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    // Every replicated write received before the flush is done once the old
                    // barrier is ours.
                    drop(before.write_owned().await);
                    // Answered only once the data and our metadata (bits of failed writes)
                    // are durable.
                    let r = match vol.store().flush().await {
                        Ok(()) => vol.persist_bitmap().await,
                        Err(e) => Err(e),
                    };
                    let errno = r.err().map_or(0, |e| e as i32);
                    peer.send(small_frame(
                        Kind::FlushAck,
                        0,
                        h.id,
                        errno.unsigned_abs().into(),
                        &[],
                    ))
                    .await;
                });
            }
            Kind::RecvAck => {
                let w = vol.with_core(|c| {
                    let s = c.r.session.as_mut()?;
                    s.waiter_mut(h.id).and_then(|w| w.recv.take())
                });
                if let Some(tx) = w {
                    let _ = tx.send(());
                }
            }
            Kind::WriteAck | Kind::FlushAck => {
                let r = if h.offset == 0 {
                    Ok(())
                } else {
                    Err(i32::try_from(h.offset).map_or(Errno::EIO, Errno::from_raw))
                };
                // Held in the transfer log until a flush covers it, or out of sync if it
                // failed; a flush forgets (or loses) the epochs it covers.
                let now = Instant::now();
                let p = vol.with_core(|c| c.r.peer_acked(h.id, r.is_ok(), now))?;
                if p.flush {
                    // Extents it unpinned may leave the activity log now.
                    vol.al_wake();
                }
                p.waiter.answer(r);
            }
            Kind::State => {
                let mut c = Cursor::new(Kind::State, &p);
                let (role, disk) = (c.u8()?, c.u8()?);
                let Some(disk) = DiskState::from_code(disk) else {
                    return Err(LinkError::UnknownDisk);
                };
                let Some(role) = Role::from_code(role) else {
                    return Err(LinkError::UnknownRole);
                };
                vol.with_core(|c| c.r.peer_report(role, disk))?;
                vol.notify();
            }
            Kind::SyncUuid => {
                let g = decode_gens(&p)?;
                let p = vol.with_core(|c| c.r.sync_uuid(g))?;
                let _ = vol.persist(p).await;
                let v = Arc::clone(&vol);
                let peer = Arc::clone(&self.peer);
                let inflight = Arc::clone(&self.inflight_rs);
                self.resync = Some(tokio::spawn(resync_target(v, peer, inflight)));
            }
            Kind::RsRequest => {
                let len = u32_payload(Kind::RsRequest, &p)?;
                range_of(&vol, h.offset, len)?;
                if len > rs_chunk(vol.with_core(|c| c.r.bitmap.granularity())) {
                    return Err(LinkError::OversizedResync);
                }
                vol.with_core(|c| c.r.check_resync_request())?;
                let Some(slot) = Slot::take(&self.serving_rs, RS_SERVE_MAX) else {
                    return Err(LinkError::TooManyResync);
                };
                let their = if p.len() == 4 + 32 { Some(p[4..].to_vec()) } else { None };
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    // The range lock is taken here, not in the reader: an application write
                    // holds its range while it waits for the peer's WriteAck, which only this
                    // reader can deliver; waiting for the lock inline would stall the link.
                    let _slot = slot;
                    let lock = vol.lock_range(h.offset, len).await;
                    let n = usize::try_from(len).expect("bounded");
                    let Ok(buf) = vol.read(h.offset, n).await else {
                        tracing::error!("resync read failed at {}", h.offset);
                        return;
                    };
                    let f = if their.as_deref() == Some(&wire::hash(&buf)[..]) {
                        vol.stats.resync_same_bytes.fetch_add(len, Relaxed);
                        small_frame(
                            Kind::RsSame,
                            0,
                            h.id,
                            h.offset,
                            &u32::try_from(len).expect("bounded").to_be_bytes(),
                        )
                    } else {
                        vol.stats.resync_sent_bytes.fetch_add(len, Relaxed);
                        block_frame(Kind::RsData, 0, h.id, h.offset, buf, digest)
                    };
                    let sent = peer.send(f).await;
                    drop(lock);
                    // Resync data needs no transfer log: the target clears its own bits on disk
                    // only once the data is flushed (its teardown and the end of the resync
                    // flush first), so after its power loss the union of the bitmaps covers it.
                    // The bits go only while the session is live: after a teardown nothing is
                    // cleared.
                    if sent {
                        vol.with_core(|c| {
                            if c.r.resync_served(peer.epoch, h.offset, len)
                                && let Some(r) = c.resync.as_mut()
                            {
                                r.add(len, Instant::now());
                            }
                        });
                    }
                });
            }
            Kind::PeerRead => {
                // A Diskless Primary reads through us (see `Replica::check_read_request`).
                let len = u32_payload(Kind::PeerRead, &p)?;
                range_of(&vol, h.offset, len)?;
                if len > crate::repl::volume::PEER_READ_MAX {
                    return Err(LinkError::OversizedRead);
                }
                vol.with_core(|c| c.r.check_read_request())?;
                let Some(slot) = Slot::take(&self.serving_rs, RS_SERVE_MAX) else {
                    return Err(LinkError::TooManyResync);
                };
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    let _slot = slot;
                    let n = usize::try_from(len).expect("bounded");
                    let f = match vol.store().read(h.offset, n).await {
                        Ok(buf) => block_frame(Kind::PeerReadData, 0, h.id, h.offset, buf, digest),
                        Err(e) => {
                            // Our disk fails too: detached if it may be, and the read fails.
                            let _ =
                                vol.disk_failed("read for the Diskless peer", h.offset, e).await;
                            let errno = u64::from((e as i32).unsigned_abs());
                            small_frame(Kind::PeerReadError, 0, h.id, errno, &[])
                        }
                    };
                    peer.send(f).await;
                });
            }
            Kind::PeerReadData | Kind::PeerReadError => {
                // Only a Diskless Primary asked; an answer after its read timed out is dropped.
                if !vol.with_core(|c| c.r.diskless() && c.r.st.role == Role::Primary) {
                    return Err(LinkError::UnaskedRead);
                }
                let r = if h.kind == Kind::PeerReadData {
                    let (data, len) = self.block_payload(&h, &p, digest)?;
                    let n = usize::try_from(len).map_err(|_| LinkError::UnaskedRead)?;
                    Ok(data.map_or_else(|| IoBuf::zeroed(n), IoBuf::from_slice))
                } else {
                    let e = i32::try_from(h.offset).map_or(Errno::EIO, Errno::from_raw);
                    Err(if e == Errno::UnknownErrno { Errno::EIO } else { e })
                };
                let waiter = self.peer.reads.lock().expect("reads poisoned").remove(&h.id);
                if let Some(tx) = waiter {
                    let _ = tx.send(r);
                }
            }
            Kind::RsData | Kind::RsSame => {
                // Only to a Secondary that asked (see `Replica::check_resync_data`).
                let same = h.kind == Kind::RsSame;
                vol.with_core(|c| c.r.check_resync_data(same))?;
                let (data, len) = if h.kind == Kind::RsSame {
                    (None, u32_payload(Kind::RsSame, &p)?)
                } else {
                    let (d, len) = self.block_payload(&h, &p, digest)?;
                    (d.map(IoBuf::from_slice), len)
                };
                range_of(&vol, h.offset, len)?;
                let lock = vol.lock_range(h.offset, len).await;
                let inflight = Arc::clone(&self.inflight_rs);
                tokio::spawn(async move {
                    let r = if same {
                        Ok(())
                    } else {
                        vol.apply_write(h.offset, data, len, h.flags & F_HOLE).await
                    };
                    drop(lock);
                    if r.is_ok() {
                        vol.with_core(|c| {
                            c.r.resync_applied(h.offset, len);
                            if let Some(r) = c.resync.as_mut() {
                                r.add(len, Instant::now());
                            }
                        });
                        if same {
                            vol.stats.resync_same_bytes.fetch_add(len, Relaxed);
                        } else {
                            vol.stats.resync_received_bytes.fetch_add(len, Relaxed);
                        }
                    }
                    vol.resync_acked.fetch_add(len, Relaxed);
                    let _ = inflight.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
                    vol.resync_wake.notify_one();
                });
            }
            Kind::RsDone => {
                let p = vol.with_core(|c| {
                    c.resync = None;
                    c.r.source_done()
                })?;
                let _ = vol.persist(p).await;
                vol.mark_in_sync();
                vol.event("resync finished (source): the peer is UpToDate".into());
                vol.notify();
            }
            Kind::OutOfSync => {
                let mut c = Cursor::new(Kind::OutOfSync, &p);
                let len = c.u64()?;
                range_of(&vol, h.offset, len)?;
                vol.with_core(|c| c.r.bitmap.set_range(h.offset, len));
            }
            Kind::VerifyRequest => {
                let len = u32_payload(Kind::VerifyRequest, &p)?;
                range_of(&vol, h.offset, len)?;
                if len > VERIFY_CHUNK {
                    return Err(LinkError::OversizedVerify);
                }
                let Some(slot) = Slot::take(&self.serving_verify, VERIFY_SERVE_MAX) else {
                    return Err(LinkError::TooManyVerify);
                };
                vol.with_core(|c| c.r.st.step(Event::PeerVerifyStart))?;
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    // Locked in the task, not the reader (see RsRequest).
                    let _slot = slot;
                    let lock = vol.lock_range(h.offset, len).await;
                    let g = vol.with_core(|c| c.r.bitmap.granularity());
                    let n = usize::try_from(len).expect("bounded");
                    let out = match vol.read(h.offset, n).await {
                        Ok(buf) => hashes(&buf, g),
                        Err(_) => Vec::new(),
                    };
                    drop(lock);
                    peer.send(small_frame(Kind::VerifyReply, 0, h.id, h.offset, &out)).await;
                });
            }
            Kind::VerifyReply => {
                let tx = self.peer.verify.lock().ok().and_then(|mut m| m.remove(&h.id));
                let Some(tx) = tx else {
                    return Err(LinkError::UnknownVerify(h.id));
                };
                let _ = tx.send(p.to_vec());
            }
            Kind::VerifyDone => {
                vol.with_core(|c| c.r.st.step(Event::PeerVerifyEnd))?;
                vol.notify();
            }
            Kind::Refuse => {
                return Err(LinkError::PeerRefused(String::from_utf8_lossy(&p).into_owned()));
            }
            Kind::Disconnect => return Ok(Some("the peer disconnected".into())),
            Kind::Hello | Kind::Auth | Kind::Params | Kind::Bitmap | Kind::ConfigKeys => {
                return Err(LinkError::HandshakeMidSession(h.kind));
            }
        }
        // A finished resync as target: all blocks in, nothing in flight.
        Ok(None)
    }

    /// The block a Data or RsData frame carries (`None`: a hole), checked against its digest.
    fn block_payload<'p>(
        &self,
        h: &Header,
        p: &'p [u8],
        digest: wire::Digest,
    ) -> Res<(Option<&'p [u8]>, u64)> {
        if h.flags & F_HOLE != 0 {
            return Ok((None, u32_payload(h.kind, p)?));
        }
        match digest.check(h.offset, p) {
            Ok(data) => Ok((Some(data), data.len() as u64)),
            Err(e) => {
                // Corrupted in flight: the block is out of sync (if the range is one of ours at
                // all); drop the link (resync follows).
                let len = p.len().saturating_sub(digest.size()) as u64;
                if range_of(&self.vol, h.offset, len).is_ok() {
                    self.vol.with_core(|c| c.r.bitmap.set_range(h.offset, len));
                }
                Err(e.into())
            }
        }
    }
}

/// After applying a replicated write: a failed block is out of sync here; the Primary learns
/// the outcome.
async fn acknowledge(vol: &Volume, peer: &Peer, h: &Header, len: u64, r: Result<(), Errno>) {
    if let Err(e) = r
        && vol.disk_failed("replicated write", h.offset, e).await
    {
        // Detached: Diskless, leaving the session; the Primary marks the write out of sync.
    } else if let Err(e) = r {
        // Found by the simulation: a Secondary that stayed UpToDate and Connected after a
        // failed write was a failover target without that block. It is Inconsistent now (on
        // disk), and the session ends so the reconnect resyncs it.
        let p = vol.with_core(|c| c.r.local_write_failed(h.offset, len));
        let _ = vol.persist(p).await;
        vol.event(format!(
            "a replicated write failed on this disk at {} ({e}): Inconsistent until resynced",
            h.offset
        ));
        vol.notify();
    }
    let errno = r.err().map_or(0, |e| e as i32);
    peer.send(small_frame(Kind::WriteAck, 0, h.id, errno.unsigned_abs().into(), &[])).await;
}

fn cfg_protocol(vol: &Volume) -> crate::repl::completion::Protocol {
    vol.config().map_or(crate::repl::completion::Protocol::C, |c| c.protocol)
}

pub(super) fn hashes(buf: &[u8], g: u64) -> Vec<u8> {
    let g = usize::try_from(g).expect("granularity fits");
    buf.chunks(g).flat_map(wire::hash).collect()
}
