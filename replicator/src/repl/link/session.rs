//! One connection from handshake to live session, and the session's loop (frames, ticks,
//! state changes, shutdown).

use super::*;

/// A connection whose other end proved it knows the secret (and is the peer, for this cluster
/// and resource): what the session goes on with.
pub(super) struct Authenticated {
    r: FrameReader,
    wr: OwnedWriteHalf,
    challenge: [u8; 32],
    theirs: Hello,
    /// The protocol version both sides speak in this session.
    version: u32,
}

/// Steps 1 and 2 of the handshake, Hello both ways and mutual authentication: nothing of the
/// volume is touched, so an acceptor may run several at once (one of them the real peer's).
pub(super) async fn authenticate(cfg: &VolumeConfig, sock: TcpStream) -> Res<Authenticated> {
    let (rd, mut wr) = sock.into_split();
    let mut r = FrameReader {
        rd,
        buf: BytesMut::with_capacity(256 * 1024),
        limit: HANDSHAKE_MAX,
        opener: None,
    };
    let t = cfg.timeout;

    // 1. Hello both ways.
    let challenge = random_bytes::<32>().map_err(|e| LinkError::NoRandomness("a challenge", e))?;
    let hello = Hello {
        version: cfg.versions.max,
        features: cfg.features,
        cluster: cfg.cluster.clone(),
        node: cfg.node.clone(),
        resource: cfg.resource.clone(),
        challenge,
        protection: cfg.protection.code(),
    };
    let mut b = BytesMut::new();
    hello.encode(&mut b);
    send_now(&mut wr, None, Kind::Hello, 0, &b).await?;
    let theirs = Hello::decode(&r.expect(Kind::Hello, t).await?)?;
    let refuse = LinkError::Handshake;
    let checked = cfg.versions.agree(theirs.version).and_then(|v| {
        handshake::check_hello(&theirs, &cfg.cluster, &cfg.peer, &cfg.resource, cfg.protection)
            .map(|()| v)
    });
    let version = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = send_now(&mut wr, None, Kind::Refuse, 0, e.to_string().as_bytes()).await;
            return Err(refuse(e));
        }
    };
    // 2. Mutual authentication, bound to the cluster, the resource and both names.
    let mine = handshake::AuthInput {
        cluster: &cfg.cluster,
        resource: &cfg.resource,
        prover: &cfg.node,
        prover_challenge: &challenge,
        verifier: &cfg.peer,
        verifier_challenge: &theirs.challenge,
    };
    send_now(&mut wr, None, Kind::Auth, 0, &handshake::auth_tag(&cfg.secret, &mine)).await?;
    let their_tag = r.expect(Kind::Auth, t).await?;
    let peers = handshake::AuthInput {
        prover: &cfg.peer,
        prover_challenge: &theirs.challenge,
        verifier: &cfg.node,
        verifier_challenge: &challenge,
        ..mine
    };
    if let Err(e) = handshake::verify_tag(&cfg.secret, &peers, &their_tag) {
        let _ = send_now(&mut wr, None, Kind::Refuse, 0, e.to_string().as_bytes()).await;
        return Err(refuse(e));
    }
    Ok(Authenticated { r, wr, challenge, theirs, version })
}

/// One authenticated connection to its end. `Ok(reason)` for an orderly end.
pub(super) async fn session(
    vol: &Arc<Volume>,
    authed: Authenticated,
    shutdown: &mut watch::Receiver<bool>,
) -> Res<String> {
    let cfg = vol.config().expect("replicated").clone();
    let Authenticated { mut r, mut wr, challenge, theirs, version } = authed;
    let t = cfg.timeout;
    let refuse = LinkError::Handshake;
    // From here every frame is sealed, both ways.
    let keys = seal::derive(&KeyInput {
        secret: &cfg.secret,
        cluster: &cfg.cluster,
        resource: &cfg.resource,
        me: &cfg.node,
        peer: &cfg.peer,
        my_challenge: &challenge,
        peer_challenge: &theirs.challenge,
        protection: cfg.protection,
    });
    let mut sealer = keys.send;
    r.opener = Some(keys.recv);
    // 3. Parameters and the plan.
    let mine = vol.params();
    let mut b = BytesMut::new();
    mine.encode(&mut b);
    send_now(&mut wr, Some(&mut sealer), Kind::Params, 0, &b).await?;
    let peer = Params::decode(&r.expect(Kind::Params, t).await?)?;
    vol.with_core(|c| (c.r.peer_size, c.protocol_version) = (Some(peer.size), Some(version)));
    if let Err(e) = handshake::check_params(&mine, &peer) {
        let _ =
            send_now(&mut wr, Some(&mut sealer), Kind::Refuse, 0, e.to_string().as_bytes()).await;
        return Err(refuse(e));
    }
    // 3b. Both files' keys, when both sides compare them: named, not refused (what must match
    // is in the fingerprint above).
    let differs = if cfg.features & theirs.features & handshake::F_CONFIG_KEYS != 0 {
        let mut b = BytesMut::new();
        cfg.config_keys.encode(&mut b);
        send_now(&mut wr, Some(&mut sealer), Kind::ConfigKeys, 0, &b).await?;
        let keys = handshake::ConfigKeys::decode(&r.expect(Kind::ConfigKeys, t).await?)?;
        Some(cfg.config_keys.differences(&keys))
    } else {
        None
    };
    if let Some(d) = differs.as_ref().filter(|d| !d.is_empty()) {
        vol.event(format!("the configuration differs from {}'s in: {}", cfg.peer, d.join(", ")));
    }
    vol.with_core(|c| c.config_differs = differs);
    let facts = |name: &str, p: &Params| Facts {
        name: name.into(),
        side: Side {
            uuids: p.uuids,
            crashed_primary: p.has(P_CRASHED_PRIMARY),
            primary: p.has(P_PRIMARY),
        },
        inconsistent: p.has(P_INCONSISTENT),
        discard_my_data: p.has(P_DISCARD_MY_DATA),
        weight: p.bitmap_weight,
    };
    let resolve = cfg.node > cfg.peer;
    let (me_f, peer_f) = (facts(&cfg.node, &mine), facts(&cfg.peer, &peer));
    let (the_plan, verdict) = plan(&cfg.policies, &me_f, &peer_f, resolve);
    vol.event(format!(
        "connected to {} (protocol version {version}): generations compared, rule {} → {:?}; plan {:?}",
        cfg.peer, verdict.rule, verdict.decision, the_plan
    ));
    match &the_plan {
        Plan::SplitBrain(why) => {
            tracing::error!(resource = %cfg.resource, peer = %cfg.peer, "SPLIT BRAIN: {why}");
            let lost = crate::repl::policy::pri_lost(&cfg.policies, &me_f, &peer_f, resolve)
                .is_some_and(|loser| loser == cfg.node);
            vol.with_core(|c| {
                c.r.give_up(true, why.clone());
                c.pri_lost = lost;
            });
            vol.event(format!("SPLIT BRAIN: {why}"));
            return Ok("split brain; StandAlone until the operator resolves it".into());
        }
        Plan::Refuse(why) => {
            tracing::error!(resource = %cfg.resource, peer = %cfg.peer, "refusing to connect: {why}");
            vol.with_core(|c| c.r.give_up(false, why.clone()));
            return Ok(format!("refused: {why}; StandAlone"));
        }
        Plan::Retry(why) => return Err(LinkError::Retry(why.clone())),
        Plan::NoSync | Plan::Source { .. } | Plan::Target { .. } => {}
    }
    vol.with_core(|c| engine::session::apply_fixup(&mut c.r.sb.uuids, verdict.fixup));
    // 3c. A scheduled standby keeps its consistent state before anything of the resync (or of
    // the replicated writes that start with the session) reaches it.
    if matches!(the_plan, Plan::Target { .. })
        && vol.scheduled().is_some()
        && let Err(why) = vol.keep_consistent_state().await
    {
        vol.event(format!(
            "cannot keep the last consistent state before the resync: {why}; not resyncing (the link retries)"
        ));
        let _ = send_now(&mut wr, Some(&mut sealer), Kind::Refuse, 0, why.as_bytes()).await;
        return Err(LinkError::Retry(format!("cannot keep the last consistent state: {why}")));
    }
    // 4. Bitmaps both ways, OR-ed. From here until the session is live no application write
    // runs: one that missed the peer has marked its blocks before our bitmap is read, and the
    // next one replicates.
    let gate = Arc::clone(&vol.io_gate).write_owned().await;
    r.limit = wire::MAX_PAYLOAD;
    let full = engine::session::full(&the_plan);
    // The writes are held for the whole exchange, so it has a deadline of its own besides the
    // per-frame one: a peer that trickles bitmap frames cannot hold them for long.
    let exchange = async {
        let mut from = Some(0);
        while let Some(f) = from {
            let mut b = BytesMut::new();
            from = vol.with_core(|c| c.r.bitmap.encode_runs(f, 4096, &mut b));
            let last = if from.is_none() { F_LAST } else { 0 };
            send_now(&mut wr, Some(&mut sealer), Kind::Bitmap, last, &b).await?;
        }
        loop {
            let (h, p) =
                tokio::time::timeout(t, r.next()).await.map_err(|_| LinkError::BitmapLate)??;
            if h.kind != Kind::Bitmap {
                return Err(LinkError::Unexpected { want: Kind::Bitmap, got: h.kind });
            }
            vol.with_core(|c| c.r.bitmap.apply_runs(&p))?;
            if h.flags & F_LAST != 0 {
                return Ok(());
            }
        }
    };
    let most = t * BITMAP_EXCHANGE_TIMEOUTS;
    tokio::time::timeout(most, exchange).await.map_err(|_| LinkError::BitmapExchange(most))??;
    let weight = vol.with_core(|c| {
        if full {
            c.r.bitmap.set_all();
        }
        c.r.bitmap.weight()
    });
    let sides = engine::session::Sides {
        me_primary: mine.has(P_PRIMARY),
        peer_primary: peer.has(P_PRIMARY),
        my_weight: mine.bitmap_weight,
        peer_weight: peer.bitmap_weight,
    };
    let Some(sync) = engine::session::start(&the_plan, weight, sides, resolve) else {
        unreachable!("plans that do not go live returned above")
    };
    // 5. Go live.
    let (tx, writer) = Tx::start(wr, Throttle::new(cfg.replication_rate_limit_kib), Some(sealer));
    let tl = TransferLog::new(cfg.transfer_log, vol.al_extent(), vol.size());
    let session = vol.with_core(|c| c.r.new_session(tl));
    let peer_h = Peer::new(tx, session.epoch);
    // The peer is Primary, the peer is Inconsistent.
    let live = (peer.has(P_PRIMARY), peer.has(P_INCONSISTENT));
    let bytes = weight * vol.with_core(|c| c.r.bitmap.granularity());
    let persist = vol.with_core(|c| {
        c.peer = Some(Arc::clone(&peer_h));
        if sync != Sync::None {
            c.resync = Some(crate::repl::volume::Run::new(bytes, Instant::now()));
        }
        c.r.go_live(session, sync, live.0, live.1)
    });
    drop(gate);
    vol.stats.connects.fetch_add(1, Relaxed);
    if vol.persist(persist).await.is_err() {
        peer_h.tx.close();
        return Err(LinkError::Metadata);
    }
    if sync == Sync::None {
        vol.mark_in_sync();
    }
    if sync == Sync::Source {
        let id = random_u64().map_err(|e| LinkError::NoRandomness("a sync generation", e))?;
        let g = vol.with_core(|c| c.r.start_sync_source(id));
        let _ = vol.persist_sb().await;
        peer_h.send(small_frame(Kind::SyncUuid, 0, 0, 0, &encode_gens(&g))).await;
        vol.event(format!("resync as source: {bytes} bytes to send to {}", cfg.peer));
    }
    vol.send_state().await;
    vol.notify();
    let mut s = Session {
        vol: Arc::clone(vol),
        peer: peer_h,
        barrier: Arc::new(RwLock::new(())),
        inflight_rs: Arc::new(AtomicU64::new(0)),
        serving_rs: Arc::new(AtomicU64::new(0)),
        serving_verify: Arc::new(AtomicU64::new(0)),
        resync: None,
        apply_room: Arc::new(Semaphore::new(APPLY_ROOM_KIB as usize)),
    };
    let end = s.run(&mut r, shutdown, writer).await;
    if let Some(h) = s.resync.take() {
        h.abort();
    }
    end
}

impl Session {
    async fn run(
        &mut self,
        r: &mut FrameReader,
        shutdown: &mut watch::Receiver<bool>,
        mut writer: tokio::task::JoinHandle<()>,
    ) -> Res<String> {
        let cfg = self.vol.config().expect("replicated").clone();
        let mut tick = tokio::time::interval(liveness::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut live = Liveness::default();
        let mut last_ping = Instant::now();
        let mut ping_out: Option<Instant> = None;
        let mut changed = self.vol.watch();
        loop {
            tokio::select! {
                f = r.next() => {
                    let (h, p) = f?;
                    ping_out = None;
                    // Every frame already received is handled under one cork: their
                    // acknowledgements leave together. A batch that takes long (a slow disk)
                    // lets them out every BATCH_SPAN, so the peer sees progress.
                    let mut cork = self.peer.tx.cork();
                    let mut since = Instant::now();
                    if let Some(end) = self.handle(h, p).await? {
                        return Ok(end);
                    }
                    while let Some((h, p)) = r.buffered()? {
                        if since.elapsed() > BATCH_SPAN {
                            drop(cork);
                            cork = self.peer.tx.cork();
                            since = Instant::now();
                        }
                        if let Some(end) = self.handle(h, p).await? {
                            return Ok(end);
                        }
                    }
                    drop(cork);
                }
                _ = tick.tick() => {
                    // A peer that answers pings but not writes (a hung disk) must not stall the
                    // Primary: after `timeout` the link is dropped and the writes go on without it.
                    let (oldest, due) = self.vol.with_core(|c| {
                        let s = c.r.session.as_ref();
                        (s.and_then(|s| s.oldest()), c.r.flush_due(Instant::now()))
                    });
                    match live.tick(Instant::now(), ping_out, oldest, cfg.ping_timeout, cfg.timeout) {
                        Verdict::Alive => {}
                        Verdict::NoPong => {
                            return Err(LinkError::NoPong(cfg.ping_timeout));
                        }
                        Verdict::Unanswered => return Err(LinkError::Unanswered(cfg.timeout)),
                    }
                    // The transfer log's bound: acknowledged writes do not wait longer (or pile up
                    // more) than configured for a flush that makes them durable on the peer.
                    if due {
                        self.vol.send_flush(&self.peer, true).await;
                    }
                    if ping_out.is_none() && last_ping.elapsed() >= cfg.ping_interval {
                        last_ping = Instant::now();
                        ping_out = Some(last_ping);
                        self.peer.send(small_frame(Kind::Ping, 0, 0, 0, &[])).await;
                    }
                }
                _ = changed.changed() => {
                    if self.vol.with_core(|c| c.r.st.conn == ConnState::Disconnecting) {
                        self.peer.send(small_frame(Kind::Disconnect, 0, 0, 0, &[])).await;
                        return Ok("disconnected on request (the operator, or the cluster manager after the heartbeat declared the peer dead)".into());
                    }
                }
                _ = stopped(shutdown) => {
                    self.peer.send(small_frame(Kind::Disconnect, 0, 0, 0, &[])).await;
                    return Ok("shutting down".into());
                }
                _ = &mut writer => return Err(LinkError::SendFailed),
            }
        }
    }
}
