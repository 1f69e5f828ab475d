//! Opening a mirror: reach every replica, tell which were lost, replaced or
//! rolled back since the last attach, record what changed, start the
//! background threads.

use super::*;

impl Mirror {
    /// Connect to the peers and start serving. A peer that cannot be
    /// reached is recorded Outdated and retried in the background. Refused
    /// if no in-sync replica (local, or a peer reached) exists, or if a
    /// replica has seen a newer generation.
    pub fn open(cfg: MirrorConfig) -> Result<Arc<Mirror>, ReplicationError> {
        check_volume_id(&cfg.volume_id)?;
        let size = cfg.params.size;
        if size == 0 || size % UNIT != 0 {
            return Err(ReplicationError::Config(format!(
                "size {size} is not a non-zero multiple of {UNIT}"
            )));
        }
        if cfg.io_timeout.is_zero() {
            return Err(ReplicationError::Config("io_timeout must not be 0".into()));
        }
        if cfg.local.is_none() && cfg.peers.is_empty() {
            return Err(ReplicationError::Config(
                "a mirror needs a local replica or at least one peer".into(),
            ));
        }
        for (i, p) in cfg.peers.iter().enumerate() {
            if p.node == cfg.node || cfg.peers[..i].iter().any(|q| q.node == p.node) {
                return Err(ReplicationError::Config(format!(
                    "peer {} is this node or listed twice",
                    p.node
                )));
            }
        }
        if let Some(local) = &cfg.local {
            let have = local.params();
            if local.volume_id() != cfg.volume_id
                || have.size != size
                || have.block_size != cfg.params.block_size
            {
                return Err(ReplicationError::Config(format!(
                    "the local replica ({} of {} bytes) is not volume {} of {size} bytes",
                    local.volume_id(),
                    have.size,
                    cfg.volume_id
                )));
            }
        }
        let local_prior = cfg.local.as_ref().map_or(0, |l| l.generation());
        if let Some(local) = &cfg.local {
            local.advance(cfg.generation)?;
        }
        let hello = Hello {
            base: cfg.base.clone(),
            ..Hello::new(&cfg.volume_id, cfg.generation, &cfg.node, cfg.params)
        };
        let handshake = handshake_timeout(cfg.io_timeout);

        // Reach every peer at once.
        let links: Vec<Result<Link, ReplicationError>> = std::thread::scope(|s| {
            let handles: Vec<_> = cfg
                .peers
                .iter()
                .map(|p| {
                    // One not in sync is copied whole (Track::new); so is
                    // one met before whose image is gone: a new image meets
                    // as Replaced, outdated before any IO.
                    let hello = Hello {
                        copied_whole: p.state != ReplicaState::InSync || p.incarnation.is_some(),
                        ..hello.clone()
                    };
                    s.spawn(move || {
                        Link::connect(&p.node, p.addr, &hello, cfg.io_timeout, handshake)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("connect thread panicked"))
                .collect()
        });

        // A replica whose image is not the recorded one lost its files:
        // recorded outdated before any IO (then its new incarnation, so
        // that a crash between the two records finds it replaced again).
        // Each reached replica: node, recorded state, incarnation seen, how
        // it meets the record, generation before this attach.
        let met: Vec<(&str, ReplicaState, Incarnation, Met, Generation)> = cfg
            .local
            .as_ref()
            .map(|l| {
                let seen = l.incarnation();
                (
                    cfg.node.as_str(),
                    cfg.local_state,
                    seen,
                    meet(cfg.local_incarnation, seen),
                    local_prior,
                )
            })
            .into_iter()
            .chain(cfg.peers.iter().zip(&links).filter_map(|(p, l)| {
                l.as_ref().ok().map(|l| {
                    let seen = l.incarnation();
                    let met = meet(p.incarnation, seen);
                    (p.node.as_str(), p.state, seen, met, l.prior_generation())
                })
            }))
            .collect();
        // Every attach reaches each in-sync replica or records it outdated
        // before any IO, so an in-sync replica that missed an attach the
        // others had was rolled back: its files restored from a backup, a
        // disk or VM snapshot reverted. Its image is the recorded one, but
        // not its content. The last attach that got through is recorded
        // too: a lone in-sync replica has no other to be compared with.
        let newest = met
            .iter()
            .filter(|m| m.1 == ReplicaState::InSync && m.3 == Met::Known)
            .map(|m| m.4)
            .chain([cfg.reached])
            .max()
            .unwrap_or(0);
        let mut replaced = Vec::new();
        // Why each replica recorded in sync is not, for the error if none is.
        let mut lost = Vec::new();
        let mut whole = Vec::new();
        for &(node, state, seen, met, prior) in &met {
            let rolled_back = state == ReplicaState::InSync && met == Met::Known && prior < newest;
            if met == Met::Replaced || rolled_back {
                if rolled_back {
                    tracing::warn!(volume = %cfg.volume, node, generation = prior, newest,
                        "replica has not seen the last attach the others had (its files were restored from a backup, or its disk rolled back): recording it outdated; it is resynced whole");
                    lost.push(format!(
                        "{node}: it has seen attach generation {prior}, not {newest} (its files were restored from a backup, or its disk rolled back), so it lacks writes"
                    ));
                } else {
                    tracing::warn!(volume = %cfg.volume, node, "replica's image is not the one recorded (its files were lost or replaced): recording it outdated; it is resynced whole");
                    lost.push(format!(
                        "{node}: its image is not the one recorded (its files were lost or replaced)"
                    ));
                }
                if state != ReplicaState::Outdated {
                    cfg.states.set_state(node, ReplicaState::Outdated)?;
                }
                replaced.push(node.to_string());
            }
            // Copied whole: its log must hide nothing once it is recorded.
            if met == Met::Replaced
                || rolled_back
                || (met == Met::First && state != ReplicaState::InSync)
            {
                whole.push(node.to_string());
                let local = cfg.local.as_deref().filter(|_| node == cfg.node);
                let link = cfg
                    .peers
                    .iter()
                    .position(|p| p.node == node)
                    .and_then(|i| links[i].as_ref().ok());
                activate_all(local, link, node, cfg.generation, cfg.io_timeout)?;
            }
            if met != Met::Known {
                cfg.states
                    .set_incarnation(node, seen, met == Met::Replaced)?;
            }
        }
        // The one now recorded: the one seen, else (unreachable) as before.
        let recorded_incarnation = |node: &str, recorded: Option<Incarnation>| {
            met.iter().find(|m| m.0 == node).map(|m| m.2).or(recorded)
        };
        let state_of = |node: &str, state: ReplicaState| {
            if replaced.iter().any(|n| n == node) {
                ReplicaState::Outdated
            } else {
                state
            }
        };

        // Not in sync, and another image than recorded (or none was), or
        // rolled back: what it misses is everything, not what the activity
        // logs name.
        let track = |node: &str, state: ReplicaState, remote: bool| {
            let mut t = Track::new(state, size, remote);
            if state != ReplicaState::InSync && whole.iter().any(|n| n == node) {
                t.mark_all_dirty();
            }
            t
        };

        let mut replicas = Vec::new();
        let mut in_sync = Vec::new();
        if let Some(local) = &cfg.local {
            let state = state_of(&cfg.node, cfg.local_state);
            if state == ReplicaState::InSync {
                in_sync.push(cfg.node.clone());
            }
            replicas.push(new_replica(
                &cfg.node,
                Endpoint::Local(local.clone()),
                track(&cfg.node, state, false),
                None,
                recorded_incarnation(&cfg.node, cfg.local_incarnation),
            ));
        }
        let mut unreachable = Vec::new();
        for (p, link) in cfg.peers.iter().zip(links) {
            let state = state_of(&p.node, p.state);
            let mut track = track(&p.node, state, true);
            let link = match link {
                Ok(l) => {
                    track.connect();
                    if state == ReplicaState::InSync {
                        in_sync.push(p.node.clone());
                    }
                    Some(Arc::new(l))
                }
                Err(ReplicationError::Refused {
                    node,
                    code: ErrorCode::Fenced,
                    message,
                }) => {
                    return Err(ReplicationError::Refused {
                        node,
                        code: ErrorCode::Fenced,
                        message,
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        volume = %cfg.volume,
                        peer = %p.node,
                        error = %e,
                        "replica unreachable at attach"
                    );
                    // Not compared with the others after an unreleased
                    // attach: writes then in flight may differ on it.
                    if cfg.verify && state == ReplicaState::InSync {
                        track.in_doubt();
                    }
                    unreachable.push(format!("{}: {e}", p.node));
                    None
                }
            };
            let incarnation = recorded_incarnation(&p.node, p.incarnation);
            replicas.push(new_replica(
                &p.node,
                Endpoint::Remote(p.addr),
                track,
                link,
                incarnation,
            ));
        }
        if in_sync.is_empty() {
            let mut why = lost;
            why.extend(unreachable);
            let detail = if why.is_empty() {
                "every replica is outdated".to_string()
            } else {
                why.join("; ")
            };
            return Err(ReplicationError::NoInSyncReplica {
                volume: cfg.volume,
                detail,
            });
        }
        // Unreachable peers miss every write from now on: record it first.
        for r in &replicas {
            let mut cell = r.cell.lock();
            if cell.track.needs_outdated_record() {
                cfg.states.set_state(&r.node, ReplicaState::Outdated)?;
                cell.track.recorded(ReplicaState::Outdated);
            }
        }
        // Every replica left in sync has seen this generation now.
        cfg.states.reached()?;

        let inner = Arc::new(Inner {
            volume_id: cfg.volume_id,
            volume: cfg.volume,
            generation: cfg.generation,
            size,
            io_timeout: cfg.io_timeout,
            hello,
            replicas: RwLock::new(replicas.into_iter().map(Arc::new).collect()),
            states: cfg.states,
            ranges: Arc::new(RangeLocks::new()),
            writes: Arc::new(AtomicUsize::new(0)),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            resync: cfg.resync,
            app_ios: AtomicU64::new(0),
            verification: Mutex::new(cfg.verify.then(|| Verification {
                total_bytes: size,
                ..Verification::default()
            })),
            hot: Hot::new(size, cfg.hot_extents),
            nudge: crossbeam_channel::bounded(1),
            resweep: AtomicBool::new(false),
            clears: AtomicU64::new(0),
        });
        let mut workers = Vec::new();
        let set = inner.set();
        let jobs = set
            .iter()
            .map(Job::Replica)
            .chain(cfg.verify.then_some(Job::Verify))
            .chain([Job::Activity]);
        for job in jobs {
            match inner.spawn(job) {
                Ok(t) => {
                    let r = match job {
                        Job::Replica(r) => Some(r.clone()),
                        _ => None,
                    };
                    workers.push((r, t))
                }
                Err(e) => {
                    inner.closed.store(true, Ordering::SeqCst);
                    for r in set.iter() {
                        r.wake();
                    }
                    for (_, t) in workers {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(
            volume = %inner.volume,
            generation = inner.generation,
            in_sync = ?in_sync,
            "replicated volume open"
        );
        if cfg.verify {
            tracing::warn!(volume = %inner.volume,
                "the last attach ended unreleased (its node was killed or cut off): comparing the replicas in the background");
        }
        Ok(Arc::new(Mirror {
            inner,
            workers: Mutex::new(workers),
        }))
    }
}

/// Mark the activity log of a replica (`local`, or over `link`) all active
/// before it is copied whole: an image of unknown content must not be
/// narrowed by its log later ([`Request::ActivateAll`]).
pub(super) fn activate_all(
    local: Option<&LocalReplica>,
    link: Option<&Link>,
    node: &str,
    generation: Generation,
    io_timeout: Duration,
) -> Result<(), ReplicationError> {
    if let Some(l) = local {
        return l.activate_all(generation);
    }
    let Some(link) = link else {
        return Ok(()); // unreachable: marked when it reconnects
    };
    let (code, message) = match link.call(Request::ActivateAll, Instant::now() + io_timeout) {
        Ok(Reply::Ok) => return Ok(()),
        Ok(_) => (ErrorCode::Io, "unexpected reply".to_string()),
        Err(CallError::Refused { code, message }) => (code, message),
        Err(e) => (ErrorCode::Io, e.to_string()),
    };
    Err(ReplicationError::Refused {
        node: node.to_string(),
        code,
        message: format!(
            "cannot mark its activity log all active before copying it whole ({message}); \
             check that node's data disk and its daemon's log, then attach again"
        ),
    })
}
