//! The IO path: writes and discards to every replica in parallel, flushes,
//! reads from a replica in sync, and what a failed replica does to them.

use super::*;

impl Inner {
    /// Replica `i` failed (its link of `epoch` if given, else it is known
    /// gone): `mark` what it missed, drop the link, and record it Outdated
    /// unless it is already. Fails (and fences the mirror) if the record
    /// cannot be made: then nothing may be acknowledged.
    pub(super) fn replica_failed(
        &self,
        r: &Replica,
        epoch: Option<u64>,
        mark: impl FnOnce(&mut Track),
    ) -> Result<(), EngineError> {
        let _t = r.transition.lock();
        if r.is_removed() {
            // No longer one of the volume's replicas: nothing to record.
            if let Some(link) = r.cell.lock().link.take() {
                link.kill();
            }
            return Ok(());
        }
        let (need, dropped) = {
            let mut cell = r.cell.lock();
            mark(&mut cell.track);
            let dropped = match epoch {
                Some(e) if cell.track.lost(e) => cell.link.take(),
                _ => None,
            };
            if r.is_local() && cell.track.disk_failed() {
                tracing::error!(volume = %self.volume, node = %r.node,
                    "local replica detached after a disk error: IO goes on with the peers");
            }
            (cell.track.needs_outdated_record(), dropped)
        };
        if let Some(link) = dropped {
            tracing::warn!(volume = %self.volume, peer = %r.node, "replica dropped");
            link.kill();
        }
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        if self.is_closed() {
            // Links are cut at close: not a failure of the replica.
            return Err(self.error("closed"));
        }
        if need {
            if let Err(e) = self.states.set_state(&r.node, ReplicaState::Outdated) {
                self.fence(&format!("cannot record replica {} outdated: {e}", r.node));
                return Err(self.fenced_error());
            }
            r.cell.lock().track.recorded(ReplicaState::Outdated);
            tracing::warn!(volume = %self.volume, peer = %r.node, "replica recorded outdated");
        }
        // Its thread reconnects it.
        r.wake();
        Ok(())
    }

    /// A write or discard: to every replica that takes writes, in parallel.
    pub(super) fn replicate(&self, offset: u64, op: WriteOp<'_>) -> Result<(), EngineError> {
        let len = op.len();
        self.check_open()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, e) = unit_span(offset, len);
        let _range = self.ranges.lock(s, e);
        self.check_open()?;
        self.hot.touch(offset, len);
        let deadline = Instant::now() + self.io_timeout;
        // Read under the range lock: a replica added later starts with
        // everything dirty, and its resync waits for this range.
        let set = self.set();
        let mut inflight = Inflight {
            replicas: Vec::new(),
        };
        let mut local: Option<(&Arc<Replica>, bool)> = None;
        let mut remote = Vec::new();
        let mut record = Vec::new();
        for r in set.iter() {
            let mut cell = r.cell.lock();
            let in_sync = cell.track.state() == ReplicaState::InSync;
            match cell.track.route(offset, len) {
                Route::Send { epoch } => {
                    cell.inflight += 1;
                    inflight.replicas.push(r.clone());
                    if r.is_local() {
                        local = Some((r, in_sync));
                    } else {
                        let link = cell.link.clone();
                        drop(cell);
                        let rx = link.and_then(|l| {
                            match op {
                                WriteOp::Write(buf) => l.submit_write(offset, buf),
                                WriteOp::Discard(n) => {
                                    l.submit(Request::Discard { offset, len: n })
                                }
                            }
                            .ok()
                        });
                        remote.push((r, epoch, in_sync, rx));
                    }
                }
                Route::Skip => {}
                Route::Record => record.push(r),
            }
        }

        let mut held_in_sync = 0;
        let mut fenced = None;
        let mut local_err = None;
        if let Some((r, in_sync)) = local {
            let l = r.local().expect("local replica");
            let res = match op {
                WriteOp::Write(buf) => l.write_at(self.generation, buf, offset),
                WriteOp::Discard(n) => l.discard(self.generation, offset, n),
            };
            match res {
                Ok(()) => held_in_sync += usize::from(in_sync),
                Err(e @ ReplicationError::Fenced { .. }) => fenced = Some(e.to_string()),
                Err(e) => local_err = Some((r, e)),
            }
        }
        let mut failed = Vec::new();
        for (r, epoch, in_sync, rx) in remote {
            let res = match rx {
                Some(rx) => rx.wait(deadline),
                None => Err(CallError::Down),
            };
            match res {
                Ok(Reply::Ok) => {
                    r.cell.lock().track.acked(epoch, offset, len);
                    held_in_sync += usize::from(in_sync);
                }
                Err(e) if e.is_fenced() => fenced = Some(format!("replica {}: {e}", r.node)),
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "unexpected reply".into(),
                    };
                    tracing::warn!(
                        volume = %self.volume,
                        peer = %r.node,
                        error = %why,
                        "write to replica failed"
                    );
                    failed.push((r, epoch));
                }
            }
        }
        if let Some(why) = fenced {
            self.fence(&why);
            return Err(self.fenced_error());
        }
        for (r, epoch) in failed {
            self.replica_failed(r, Some(epoch), |t| t.mark_dirty(offset, len))?;
        }
        for r in record {
            self.replica_failed(r, None, |_| {})?;
        }
        if let Some((r, e)) = local_err {
            self.local_failed(r, e, held_in_sync, |t| t.mark_dirty(offset, len))?;
        }
        if held_in_sync == 0 {
            return Err(self.error("no in-sync replica holds the write"));
        }
        Ok(())
    }

    /// The local replica `i` failed an IO with `e` (not fencing). With an
    /// in-sync peer holding the IO (`held_in_sync`), detach it (`mark`
    /// what it missed) and go on, as DRBD does on a disk error; its thread
    /// reattaches and resyncs it. Alone, the error is the IO's.
    fn local_failed(
        &self,
        r: &Replica,
        e: ReplicationError,
        held_in_sync: usize,
        mark: impl FnOnce(&mut Track),
    ) -> Result<(), EngineError> {
        if held_in_sync == 0 || matches!(e, ReplicationError::Fenced { .. }) {
            return Err(self.local_error(e));
        }
        tracing::error!(volume = %self.volume, node = %r.node, error = %e,
            "IO on the local replica failed");
        self.replica_failed(r, None, mark)
    }

    pub(super) fn flush(&self) -> Result<(), EngineError> {
        self.check_open()?;
        let deadline = Instant::now() + self.io_timeout;
        let set = self.set();
        let mut inflight = Inflight {
            replicas: Vec::new(),
        };
        let mut local = None;
        let mut remote = Vec::new();
        for r in set.iter() {
            let mut cell = r.cell.lock();
            if !cell.track.receives_writes() {
                continue;
            }
            let in_sync = cell.track.state() == ReplicaState::InSync;
            cell.inflight += 1;
            inflight.replicas.push(r.clone());
            if r.is_local() {
                local = Some((r, in_sync));
                continue;
            }
            let epoch = cell.track.epoch();
            let taken = cell.track.take_unflushed();
            let link = cell.link.clone();
            drop(cell);
            let rx = link.and_then(|l| l.submit(Request::Flush).ok());
            remote.push((r, epoch, in_sync, taken, rx));
        }
        let mut held_in_sync = 0;
        let mut fenced = None;
        let mut local_err = None;
        if let Some((r, in_sync)) = local {
            match r.local().expect("local").flush(self.generation) {
                Ok(()) => held_in_sync += usize::from(in_sync),
                Err(e @ ReplicationError::Fenced { .. }) => fenced = Some(e.to_string()),
                Err(e) => local_err = Some((r, e)),
            }
        }
        let mut failed = Vec::new();
        for (r, epoch, in_sync, taken, rx) in remote {
            let res = match rx {
                Some(rx) => rx.wait(deadline),
                None => Err(CallError::Down),
            };
            match res {
                Ok(Reply::Ok) => held_in_sync += usize::from(in_sync),
                Err(e) if e.is_fenced() => fenced = Some(format!("replica {}: {e}", r.node)),
                _ => failed.push((r, epoch, taken)),
            }
        }
        if let Some(why) = fenced {
            self.fence(&why);
            return Err(self.fenced_error());
        }
        for (r, epoch, taken) in failed {
            tracing::warn!(volume = %self.volume, peer = %r.node, "flush of replica failed");
            self.replica_failed(r, Some(epoch), |t| {
                if let Some(taken) = &taken {
                    t.flush_failed(taken);
                }
            })?;
        }
        if let Some((r, e)) = local_err {
            // A failed sync may have lost any write since the last one.
            self.local_failed(r, e, held_in_sync, Track::mark_all_dirty)?;
        }
        if held_in_sync == 0 {
            return Err(self.error("no in-sync replica completed the flush"));
        }
        self.hot.tick();
        if self.hot.over() {
            let _ = self.nudge.0.try_send(());
        }
        Ok(())
    }

    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        match self.read_from_in_sync(None, buf, offset) {
            Ok(_) => Ok(()),
            Err(ReadError::Engine(e)) => Err(e),
            Err(ReadError::NoSource(why)) => Err(self.error(why)),
        }
    }

    /// Read from an in-sync replica other than `exclude`: the local one if
    /// it is, else a peer (failing replicas are dropped and the next tried).
    /// Returns the replica read.
    pub(super) fn read_from_in_sync(
        &self,
        exclude: Option<&Replica>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<Arc<Replica>, ReadError> {
        let set = self.set();
        let excluded = |r: &Replica| exclude.is_some_and(|x| std::ptr::eq(x, r));
        for r in set.iter() {
            if excluded(r) {
                continue;
            }
            let (epoch, link) = {
                let cell = r.cell.lock();
                if !cell.track.readable() {
                    continue;
                }
                (cell.track.epoch(), cell.link.clone())
            };
            if let Endpoint::Local(l) = &r.endpoint {
                let e = match l.read_at(self.generation, buf, offset) {
                    Ok(()) => return Ok(r.clone()),
                    Err(e) => e,
                };
                let others = set.iter().any(|o| {
                    !std::ptr::eq(&**o, &**r) && !excluded(o) && o.cell.lock().track.readable()
                });
                let len = buf.len() as u64;
                self.local_failed(r, e, usize::from(others), |t| t.mark_dirty(offset, len))
                    .map_err(ReadError::Engine)?;
                continue;
            }
            let Some(link) = link else { continue };
            match self.read_remote(&link, buf, offset) {
                Ok(()) => return Ok(r.clone()),
                Err(e) if e.is_fenced() => {
                    self.fence(&format!("replica {}: {e}", r.node));
                    return Err(ReadError::Engine(self.fenced_error()));
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, peer = %r.node, error = %e, "read from replica failed");
                    self.replica_failed(r, Some(epoch), |_| {})
                        .map_err(ReadError::Engine)?;
                }
            }
        }
        Err(ReadError::NoSource(
            "no in-sync replica can be read".to_string(),
        ))
    }

    fn read_remote(&self, link: &Link, buf: &mut [u8], offset: u64) -> Result<(), CallError> {
        let deadline = Instant::now() + self.io_timeout;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_READ);
            let req = Request::Read {
                offset: offset + done as u64,
                len: n as u32,
            };
            match link.call(req, deadline)? {
                Reply::Data(d) if d.len() == n => buf[done..done + n].copy_from_slice(&d),
                _ => return Err(CallError::Unexpected),
            }
            done += n;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub(super) enum ReadError {
    Engine(EngineError),
    NoSource(String),
}
