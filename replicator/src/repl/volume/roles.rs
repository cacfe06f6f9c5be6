//! Operator and cluster commands on a replicated volume: promote, demote, outdate, connect,
//! disconnect, invalidate, freeze, close. Each asks the engine's [`Replica`] and carries out
//! what it returns.

use super::*;

impl Volume {
    // ------------------------------------------------------------------ roles

    /// `duet primary [--force]`.
    pub async fn promote(&self, force: bool) -> Result<String, Refused> {
        // A scheduled standby cut off mid-catch-up promotes its last consistent state, never
        // the half-synced data (forced: it is the newest state this node can vouch for).
        let restored = match self.restorable() {
            Some(kept) => {
                self.restore_consistent_state(&kept).await?;
                true
            }
            None => false,
        };
        let force = force || restored;
        let new_id = random_u64().map_err(|e| {
            Refused(format!(
                "the kernel gave no randomness for a generation identifier ({e}); not promoted"
            ))
        })?;
        let Promotion::Promoted { fresh, was } = self.with_core(|c| c.r.promote(force, new_id))?
        else {
            return Ok("already Primary".into());
        };
        if self.persist_sb().await.is_err() {
            self.with_core(|c| c.r.promotion_failed(was));
            return refuse("cannot write the metadata (I/O error); not promoted");
        }
        self.send_state().await;
        self.event(format!("promoted to Primary{}", if force { " (forced)" } else { "" }));
        self.drop_kept_state();
        self.notify();
        if restored {
            return Ok(
                "Primary, with the last consistent state (the resync that was running is undone)"
                    .into(),
            );
        }
        Ok(if fresh {
            "Primary (forced: this node's data is now the source of truth)".into()
        } else {
            "Primary".into()
        })
    }

    /// Freezes (or thaws) I/O: while frozen, writes that could not reach the peer are not
    /// answered (resource-and-stonith fencing).
    pub fn set_frozen(&self, on: bool) {
        if self.frozen.send_replace(on) != on {
            self.event(if on {
                "I/O frozen while the peer is fenced".into()
            } else {
                "I/O resumed".into()
            });
        }
    }

    pub(super) async fn thawed(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }

    /// Marks this node's data Outdated (on disk) at the peer's request: its replication link
    /// is down while it still writes, so our data is behind and must not be promoted.
    pub async fn outdate(&self) -> Result<String, Refused> {
        if self.cfg.is_none() {
            return refuse("this resource has no peer");
        }
        let Some(p) = self.with_core(|c| c.r.outdate())? else {
            return Ok("Inconsistent (already unusable)".into());
        };
        self.persist(p).await.map_err(|_| Refused("cannot write the metadata".into()))?;
        self.event("outdated at the peer's request: this data must not be promoted".into());
        self.notify();
        Ok("Outdated".into())
    }

    /// Records on disk that the peer's data is Outdated (so after a restart alone this node
    /// knows its data is the newest).
    pub async fn set_peer_outdated(&self) -> Result<(), Refused> {
        let p = self.with_core(|c| c.r.peer_outdated());
        self.persist(p).await.map_err(|_| Refused("cannot write the metadata".into()))
    }

    /// `duet secondary`, after the daemon closed the NBD export (nothing in flight).
    ///
    /// The peer flushes first what it acknowledged (the engine refuses to demote before: see
    /// `Replica::demote`); a peer that does not answer in time loses the session instead, whose
    /// teardown marks those writes.
    pub async fn demote(&self) -> Result<String, Refused> {
        let mut tries = 0;
        let p = loop {
            match self.with_core(|c| c.r.demote()) {
                Ok(None) => return Ok("already Secondary".into()),
                Ok(Some(p)) => break p,
                Err(unflushed) if tries < 3 => {
                    tries += 1;
                    tracing::debug!("{unflushed}");
                    let limit = self.cfg.as_ref().map_or(Duration::from_secs(5), |c| c.timeout);
                    let peer = self.with_core(|c| c.peer.clone());
                    let flushed = match peer {
                        Some(peer) => match self.send_flush(&peer, false).await {
                            Some((_, done)) => {
                                matches!(tokio::time::timeout(limit, done).await, Ok(Ok(Ok(()))))
                            }
                            None => false,
                        },
                        None => false,
                    };
                    if !flushed {
                        self.drop_peer(limit).await;
                    }
                }
                Err(unflushed) => {
                    return refuse(format!(
                        "cannot demote: {unflushed}, and the session would not end"
                    ));
                }
            }
        };
        if self.persist(p).await.is_err() {
            tracing::error!("writing data and metadata at demotion failed");
        }
        self.send_state().await;
        self.event("demoted to Secondary".into());
        self.notify();
        Ok("Secondary".into())
    }

    pub(crate) async fn send_state(&self) {
        let (peer, role, disk) = {
            let c = self.core.lock().expect("volume state poisoned");
            (c.peer.clone(), c.r.st.role, c.r.st.disk)
        };
        if let Some(p) = peer {
            let payload = [role.code(), disk.code()];
            p.send(small_frame(Kind::State, 0, 0, 0, &payload)).await;
        }
    }

    /// The Params this node sends at connect.
    pub(crate) fn params(&self) -> Params {
        let c = self.core.lock().expect("volume state poisoned");
        let mut flags = 0;
        if c.r.st.role == Role::Primary {
            flags |= P_PRIMARY;
        }
        if c.r.crashed_primary() {
            flags |= P_CRASHED_PRIMARY;
        }
        if c.r.discard_my_data {
            flags |= P_DISCARD_MY_DATA;
        }
        match c.r.st.disk {
            DiskState::Inconsistent | DiskState::Diskless => flags |= P_INCONSISTENT,
            DiskState::Outdated => flags |= P_OUTDATED,
            DiskState::Consistent | DiskState::UpToDate => {}
        }
        Params {
            size: self.size,
            fingerprint: self.cfg.as_ref().map_or(0, |c| c.fingerprint),
            uuids: c.r.sb.uuids,
            flags,
            bitmap_weight: c.r.bitmap.weight(),
        }
    }

    /// `duet connect [--discard-my-data]`.
    pub fn connect(&self, discard_my_data: bool) -> Result<String, Refused> {
        if self.cfg.is_none() {
            return refuse("this resource has no peer in the configuration");
        }
        if self.with_core(|c| c.r.connect(discard_my_data))? {
            return Ok("already connected".into());
        }
        self.notify();
        Ok(if discard_my_data {
            "connecting; this node's changes will be discarded".into()
        } else {
            "connecting".into()
        })
    }

    /// Ends the current replication session (the peer was declared dead by the heartbeat) and
    /// waits up to `wait` for the teardown; the link reconnects when the peer is back.
    pub async fn drop_peer(&self, wait: Duration) {
        let had = {
            let mut c = self.core.lock().expect("volume state poisoned");
            let had = c.peer.is_some();
            let _ = c.r.st.step(Ev::DropPeer);
            had
        };
        if !had {
            return;
        }
        self.event("replication session dropped: the heartbeat declared the peer dead".into());
        self.notify();
        let end = Instant::now() + wait;
        while self.core.lock().expect("volume state poisoned").peer.is_some()
            && Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `duet disconnect`.
    pub fn disconnect(&self) -> Result<String, Refused> {
        let mut c = self.core.lock().expect("volume state poisoned");
        let _ = c.r.st.step(Ev::Disconnect);
        drop(c);
        self.notify();
        Ok("disconnecting".into())
    }

    /// `duet invalidate`: every block out of sync, disk Inconsistent; the next connect resyncs
    /// everything from the peer.
    pub async fn invalidate(&self) -> Result<String, Refused> {
        if self.cfg.is_none() {
            return refuse("this resource has no peer to resync from");
        }
        let p = self.with_core(|c| c.r.invalidate())?;
        let _ = self.persist(p).await;
        self.event("invalidated: every block out of sync, full resync from the peer".into());
        self.notify();
        Ok("invalidated; a full resync from the peer follows".into())
    }

    /// At shutdown: flush, write the bitmap, and clear "crashed primary" (this is a clean stop).
    pub async fn close(&self) {
        if self.meta.is_none() {
            let _ = self.store.flush().await;
            return;
        }
        let p = self.with_core(|c| c.r.close());
        let _ = self.persist(p).await;
    }
}
