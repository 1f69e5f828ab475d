//! A replica's background thread: reconnect it, then copy over what it
//! misses (narrowed by the activity logs), then record it in sync.

use super::*;

impl Inner {
    /// The background thread of replica `r`: reconnect it when it drops,
    /// resync it when it is behind.
    pub(super) fn background(&self, r: &Arc<Replica>) {
        let mut backoff = MIN_BACKOFF;
        // Say it once per outage and reason, not once per attempt.
        let mut warned: Option<String> = None;
        loop {
            if self.is_closed() || r.is_removed() {
                return;
            }
            if self.is_fenced() {
                r.sleep(MAX_BACKOFF);
                continue;
            }
            let (connected, state) = {
                let cell = r.cell.lock();
                (cell.track.connected(), cell.track.state())
            };
            if connected && state == ReplicaState::InSync {
                r.sleep(MAX_BACKOFF);
                continue;
            }
            let step = if connected {
                self.resync(r)
            } else {
                self.reconnect(r)
            };
            match step {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    warned = None;
                }
                Err(Stop::Done) => {}
                Err(Stop::Retry(why)) => {
                    if warned.as_deref() == Some(why.as_str()) {
                        tracing::debug!(volume = %self.volume, peer = %r.node, why, "replica not back yet");
                    } else {
                        tracing::warn!(volume = %self.volume, peer = %r.node, why, "replica not back yet; retrying");
                        warned = Some(why);
                    }
                    r.sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    pub(super) fn reconnect(&self, r: &Replica) -> Result<(), Stop> {
        let Endpoint::Remote(addr) = r.endpoint else {
            // A detached local disk: try it again (resync tells).
            let mut cell = r.cell.lock();
            if !cell.track.connected() && !self.is_closed() {
                cell.track.connect();
                tracing::info!(volume = %self.volume, node = %r.node, "local replica reattached");
            }
            return Ok(());
        };
        // Outdated here (recorded when it dropped, or at open), and an
        // image made for this Hello meets as Replaced or First: all dirty.
        let hello = Hello {
            copied_whole: true,
            ..self.hello.clone()
        };
        let link = match Link::connect(
            &r.node,
            addr,
            &hello,
            self.io_timeout,
            handshake_timeout(self.io_timeout),
        ) {
            Ok(l) => Arc::new(l),
            Err(ReplicationError::Refused {
                code: ErrorCode::Fenced,
                message,
                ..
            }) => {
                self.fence(&format!("replica {}: {message}", r.node));
                return Err(Stop::Done);
            }
            Err(e) => return Err(Stop::Retry(e.to_string())),
        };
        // Another image than before (the node lost its files while away):
        // what it missed is everything, not the dirty map. One never met
        // (a volume from before incarnations; a replica down since its
        // volume was made) is compared whole too: cheap where it holds
        // the data. Recorded before its resync can record it in sync.
        let seen = link.incarnation();
        let met = meet(r.cell.lock().incarnation, seen);
        if met != Met::Known {
            // Copied whole: its log must hide nothing once it is recorded.
            if let Err(e) =
                activate_all(None, Some(&link), &r.node, self.generation, self.io_timeout)
            {
                link.kill();
                if matches!(
                    e,
                    ReplicationError::Refused {
                        code: ErrorCode::Fenced,
                        ..
                    }
                ) {
                    self.fence(&e.to_string());
                    return Err(Stop::Done);
                }
                return Err(Stop::Retry(e.to_string()));
            }
            let _t = r.transition.lock();
            let replaced = met == Met::Replaced;
            if let Err(e) = self.states.set_incarnation(&r.node, seen, replaced) {
                link.kill();
                if matches!(e, crate::replication::StateStoreError::Fenced { .. }) {
                    self.fence(&e.to_string());
                    return Err(Stop::Done);
                }
                return Err(Stop::Retry(format!("cannot record its incarnation: {e}")));
            }
        }
        let mut cell = r.cell.lock();
        if self.is_closed() || r.is_removed() {
            drop(cell);
            link.kill();
            return Err(Stop::Done);
        }
        cell.link = Some(link);
        cell.incarnation = Some(seen);
        cell.track.connect();
        if met != Met::Known {
            cell.track.mark_all_dirty();
        }
        if met == Met::Replaced {
            tracing::warn!(volume = %self.volume, peer = %r.node, "replica reconnected with another image (its files were lost or replaced): resyncing it whole");
        } else {
            tracing::info!(volume = %self.volume, peer = %r.node, "replica reconnected");
        }
        Ok(())
    }

    /// Bring connected replica `r` up to date, then record it in sync.
    pub(super) fn resync(&self, r: &Replica) -> Result<(), Stop> {
        // Writes routed over an older link settle first: a late ack or
        // failure of one marks its range dirty, which must happen before
        // the map is walked.
        let epoch = {
            let mut cell = r.cell.lock();
            while cell.inflight > 0 && !self.is_closed() && !r.is_removed() {
                r.settled.wait_for(&mut cell, Duration::from_millis(100));
            }
            if !cell.track.connected() {
                return Err(Stop::Retry("dropped".into()));
            }
            cell.track.epoch()
        };
        self.stop_check()?;
        self.narrow(r, epoch);
        if r.cell.lock().track.state() == ReplicaState::Outdated {
            let _t = r.transition.lock();
            if r.is_removed() {
                return Err(Stop::Done);
            }
            if !r.cell.lock().track.connected() {
                return Err(Stop::Retry("dropped".into()));
            }
            self.record(r, ReplicaState::Resyncing)?;
            let mut cell = r.cell.lock();
            cell.track.recorded(ReplicaState::Resyncing);
            tracing::info!(
                volume = %self.volume,
                peer = %r.node,
                dirty_bytes = cell.track.dirty().bytes(),
                "replica resyncing"
            );
        }

        let mut cursor = 0;
        let mut buf = Vec::new();
        let unknown = r.cell.lock().track.content_unknown();
        let mut pace = Pacer::new(self.resync, Instant::now(), self.app_ios());
        loop {
            self.stop_check()?;
            if r.is_removed() {
                return Err(Stop::Done);
            }
            let wait = pace.wait(Instant::now(), self.app_ios());
            if !wait.is_zero() {
                r.sleep(wait.min(MAX_BACKOFF));
                continue;
            }
            let (run, link) = {
                let mut cell = r.cell.lock();
                cell.track.set_yielding(pace.is_busy());
                if !cell.track.connected() || cell.track.epoch() != epoch {
                    return Err(Stop::Retry("dropped".into()));
                }
                match cell.track.dirty().next_run(cursor, MAX_RUN_UNITS) {
                    Some(run) => (run, cell.link.clone()),
                    None => break,
                }
            };
            let _range = self.ranges.lock(run.0, run.1);
            // No write to the run is in flight now: take it.
            let run = {
                let mut cell = r.cell.lock();
                if !cell.track.connected() || cell.track.epoch() != epoch {
                    return Err(Stop::Retry("dropped".into()));
                }
                match cell.track.take_run(run.0, run.1 - run.0) {
                    // Still the same start (nothing clears bits but us).
                    Some(taken) if taken.0 == run.0 => taken,
                    Some(other) => {
                        cell.track.run_failed(other);
                        continue;
                    }
                    None => break,
                }
            };
            let offset = run.0 * UNIT;
            let len = ((run.1 - run.0) * UNIT).min(self.size - offset) as usize;
            pace.add(len as u64);
            buf.resize(len, 0);
            if let Err(e) = self.read_from_in_sync(Some(r), &mut buf, offset) {
                r.cell.lock().track.run_failed(run);
                return Err(match e {
                    ReadError::Engine(e) if self.is_fenced() => {
                        tracing::debug!(error = %e, "resync source fenced");
                        Stop::Done
                    }
                    ReadError::Engine(e) => Stop::Retry(e.to_string()),
                    ReadError::NoSource(why) => Stop::Retry(why),
                });
            }
            // A full resync: most of it may be there already (a replica
            // that missed some writes under an earlier primary).
            if unknown && self.holds(r, link.as_deref(), &buf, offset) {
                let mut cell = r.cell.lock();
                cell.track.run_copied(len as u64, 0);
                cursor = run.1;
                continue;
            }
            let sent = self.copy_to(r, link.as_deref(), &buf, offset);
            match sent {
                Ok(data_bytes) => {
                    let mut cell = r.cell.lock();
                    cell.track.run_copied(len as u64, data_bytes);
                    cell.track.acked(epoch, offset, len as u64);
                }
                Err(e) => {
                    if e.is_fenced() {
                        r.cell.lock().track.run_failed(run);
                        self.fence(&format!("replica {}: {e}", r.node));
                        return Err(Stop::Done);
                    }
                    tracing::warn!(volume = %self.volume, peer = %r.node, error = %e, "resync write failed");
                    return Err(
                        match self.replica_failed(r, Some(epoch), |t| t.run_failed(run)) {
                            Ok(()) => Stop::Retry(e.to_string()),
                            Err(_) => Stop::Done,
                        },
                    );
                }
            }
            cursor = run.1;
        }

        // Everything copied: make it durable, then record it.
        let (taken, link) = {
            let mut cell = r.cell.lock();
            (cell.track.take_unflushed(), cell.link.clone())
        };
        let flushed = match &r.endpoint {
            Endpoint::Local(l) => l.flush(self.generation).map_err(|e| CallError::Refused {
                code: match e {
                    ReplicationError::Fenced { .. } => ErrorCode::Fenced,
                    _ => ErrorCode::Io,
                },
                message: e.to_string(),
            }),
            Endpoint::Remote(_) => match &link {
                Some(l) => l
                    .call(Request::Flush, Instant::now() + self.io_timeout)
                    .map(drop),
                None => Err(CallError::Down),
            },
        };
        if let Err(e) = flushed {
            if e.is_fenced() {
                self.fence(&format!("replica {}: {e}", r.node));
                return Err(Stop::Done);
            }
            return Err(
                match self.replica_failed(r, Some(epoch), |t| {
                    if let Some(taken) = &taken {
                        t.flush_failed(taken);
                    }
                }) {
                    Ok(()) => Stop::Retry(e.to_string()),
                    Err(_) => Stop::Done,
                },
            );
        }
        let _t = r.transition.lock();
        if r.is_removed() {
            return Err(Stop::Done);
        }
        if !r.cell.lock().track.may_finish(epoch) {
            return Ok(());
        }
        self.record(r, ReplicaState::InSync)?;
        let mut cell = r.cell.lock();
        cell.track.recorded(ReplicaState::InSync);
        tracing::info!(
            volume = %self.volume,
            peer = %r.node,
            sent_bytes = cell.track.sent_bytes(),
            "replica in sync"
        );
        // Its resync marked what it copied active: clear what this
        // attach has not written.
        self.resweep.store(true, Ordering::Release);
        let _ = self.nudge.0.try_send(());
        Ok(())
    }

    /// What outdated replica `r` misses, narrowed from the whole device to
    /// the extents active in its own activity log or in those of the other
    /// replicas, when all of those are in sync, their logs can be read and
    /// its log took every clear theirs did (see [`Track::narrow`]; an older
    /// stamp: rolled back past a clear, or a clear failed there). Under the
    /// whole device's range lock, so that no write is between its mark in a
    /// log and its mark in the map.
    pub(super) fn narrow(&self, r: &Replica, epoch: u64) {
        if !r.cell.lock().track.narrowable() {
            return;
        }
        let (s, e) = unit_span(0, self.size);
        let _all = self.ranges.lock(s, e);
        let mut union = vec![0u64; activity::extents(self.size).div_ceil(64) as usize];
        let deadline = Instant::now() + self.io_timeout;
        let (mut mine, mut newest) = (activity::Stamp::default(), activity::Stamp::default());
        for q in self.set().iter() {
            let me = std::ptr::eq(&**q, r);
            if !me && !q.cell.lock().track.readable() {
                tracing::debug!(volume = %self.volume, peer = %r.node, other = %q.node,
                    "not narrowing the resync: another replica is not in sync");
                return;
            }
            let Some((stamp, words)) = self.activity_of(q, deadline) else {
                tracing::debug!(volume = %self.volume, peer = %r.node, other = %q.node,
                    "not narrowing the resync: an activity log cannot be read");
                return;
            };
            if me {
                mine = stamp;
            } else {
                newest = newest.max(stamp);
            }
            for (u, w) in union.iter_mut().zip(words) {
                *u |= w;
            }
        }
        if mine < newest {
            tracing::warn!(volume = %self.volume, peer = %r.node, ?mine, ?newest,
                "the replica's activity log missed a clear the others took (its files were rolled back, or the clear failed there): resyncing it whole");
            return;
        }
        let keep: Vec<(u64, u64)> = self
            .extent_ranges(&union)
            .into_iter()
            .map(|(s, e)| unit_span(s, e - s))
            .collect();
        let mut cell = r.cell.lock();
        if !cell.track.connected() || cell.track.epoch() != epoch {
            return;
        }
        if cell.track.narrow(&keep) {
            tracing::info!(volume = %self.volume, peer = %r.node,
                bytes = cell.track.dirty().bytes(), of = self.size,
                "what the replica misses is what the activity logs name: resyncing only that");
        }
    }

    fn stop_check(&self) -> Result<(), Stop> {
        if self.is_closed() || self.is_fenced() {
            Err(Stop::Done)
        } else {
            Ok(())
        }
    }

    /// Record `state` for replica `r` (the caller holds its transition lock).
    pub(super) fn record(&self, r: &Replica, state: ReplicaState) -> Result<(), Stop> {
        match self.states.set_state(&r.node, state) {
            Ok(()) => Ok(()),
            Err(e @ crate::replication::StateStoreError::Fenced { .. }) => {
                self.fence(&e.to_string());
                Err(Stop::Done)
            }
            Err(e) => Err(Stop::Retry(format!("cannot record {state}: {e}"))),
        }
    }

    /// Write a resync run to replica `r`: its all-zero units as discards,
    /// the rest as data (requests pipelined). Returns the bytes of data sent.
    pub(super) fn copy_to(
        &self,
        r: &Replica,
        link: Option<&Link>,
        buf: &[u8],
        offset: u64,
    ) -> Result<u64, CallError> {
        let segments = zero_segments(buf);
        let data_bytes = segments
            .iter()
            .filter(|s| !s.2)
            .map(|s| s.1.len() as u64)
            .sum();
        if let Some(l) = r.local() {
            for (at, range, zero) in segments {
                let off = offset + at;
                let res = if zero {
                    l.discard(self.generation, off, range.len() as u64)
                } else {
                    l.write_at(self.generation, &buf[range], off)
                };
                res.map_err(|e| CallError::Refused {
                    code: match e {
                        ReplicationError::Fenced { .. } => ErrorCode::Fenced,
                        _ => ErrorCode::Io,
                    },
                    message: e.to_string(),
                })?;
            }
            return Ok(data_bytes);
        }
        let link = link.ok_or(CallError::Down)?;
        let deadline = Instant::now() + self.io_timeout;
        let mut pending = Vec::new();
        for (at, range, zero) in segments {
            let off = offset + at;
            let rx = if zero {
                link.submit(Request::Discard {
                    offset: off,
                    len: range.len() as u64,
                })
            } else {
                link.submit_write(off, &buf[range])
            }
            .map_err(|_| CallError::Down)?;
            pending.push(rx);
        }
        for rx in pending {
            match rx.wait(deadline)? {
                Reply::Ok => {}
                _ => return Err(CallError::Unexpected),
            }
        }
        Ok(data_bytes)
    }
}
