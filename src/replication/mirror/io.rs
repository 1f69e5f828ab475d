//! The IO path: writes and discards to every replica in parallel, flushes,
//! reads from a replica in sync, and what a failed replica does to them.
//! A write is begun ([`Inner::begin_write`]: range lock, routing), sent,
//! written locally, then ended once every replica answered
//! ([`Inner::end_write`]); the caller waits for the answers
//! ([`Inner::replicate`]) or leaves that to whoever reads the last one
//! ([`Inner::replicate_then`]).

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
        let Some((mut call, remote)) = self.begin_write(offset, op)? else {
            return Ok(());
        };
        let deadline = Instant::now() + self.io_timeout;
        // Remote replicas first (they work meanwhile), then the local one.
        let tickets: Vec<_> = remote
            .into_iter()
            .map(|Routed { sent, link }| {
                let ticket = link.and_then(|l| {
                    match op {
                        WriteOp::Write(buf) => l.submit_write(offset, buf),
                        WriteOp::Discard(n) => l.submit(Request::Discard { offset, len: n }),
                    }
                    .ok()
                });
                (sent, ticket)
            })
            .collect();
        self.write_local(&mut call, offset, op);
        for (sent, ticket) in tickets {
            let res = match ticket {
                Some(t) => t.wait(deadline),
                None => Err(CallError::Down),
            };
            call.settle(sent, res, &self.volume);
        }
        self.end_write(call)
    }

    /// [`Inner::replicate`] of a write whose outcome goes to `done`, run
    /// on the thread that reads the last replica's reply: the caller
    /// (a FUSE thread) does not wait for the network.
    pub(super) fn replicate_then(self: &Arc<Self>, offset: u64, buf: &[u8], done: WriteDone) {
        let (mut call, remote) = match self.begin_write(offset, WriteOp::Write(buf)) {
            Ok(Some(begun)) => begun,
            Ok(None) => return done(Ok(())),
            Err(e) => return done(Err(e)),
        };
        let deadline = Instant::now() + self.io_timeout;
        // One share per remote replica and one for this thread, which
        // writes the local replica after sending.
        let shared = Arc::new(PendingWrite {
            inner: self.clone(),
            state: Mutex::new(PendingState {
                call: None,
                answers: Vec::new(),
                left: remote.len() + 1,
                done: Some(done),
            }),
        });
        for Routed { sent, link } in remote {
            let pending = shared.clone();
            let then: Callback = Box::new(move |res| pending.settle(Some((sent, res)), None));
            match link {
                Some(l) => l.submit_write_then(offset, buf, deadline, then),
                None => then(Err(CallError::Down)),
            }
        }
        self.write_local(&mut call, offset, WriteOp::Write(buf));
        shared.settle(None, Some(call));
    }

    /// The first half of a write: checks, the range lock, the routing, and
    /// the replicas to send it to (`None`: nothing to write).
    fn begin_write(&self, offset: u64, op: WriteOp<'_>) -> Result<Option<Begun>, EngineError> {
        let len = op.len();
        self.check_open()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let (s, e) = unit_span(offset, len);
        let range = self.ranges.lock_owned(s, e);
        let counted = Counted::new(&self.writes);
        self.check_open()?;
        self.hot.touch(offset, len);
        // Read under the range lock: a replica added later starts with
        // everything dirty, and its resync waits for this range.
        let set = self.set();
        let mut call = WriteCall {
            offset,
            len,
            _range: range,
            _counted: counted,
            inflight: Inflight {
                replicas: Vec::new(),
            },
            local: None,
            record: Vec::new(),
            held_in_sync: 0,
            fenced: None,
            local_err: None,
            failed: Vec::new(),
        };
        let mut remote = Vec::new();
        for r in set.iter() {
            let mut cell = r.cell.lock();
            let in_sync = cell.track.state() == ReplicaState::InSync;
            match cell.track.route(offset, len) {
                Route::Send { epoch } => {
                    cell.inflight += 1;
                    call.inflight.replicas.push(r.clone());
                    if r.is_local() {
                        call.local = Some((r.clone(), in_sync));
                    } else {
                        let link = cell.link.clone();
                        let sent = Sent {
                            replica: r.clone(),
                            epoch,
                            in_sync,
                        };
                        remote.push(Routed { sent, link });
                    }
                }
                Route::Skip => {}
                Route::Record => call.record.push(r.clone()),
            }
        }
        Ok(Some((call, remote)))
    }

    /// Write the local replica's copy, if it takes this write.
    fn write_local(&self, call: &mut WriteCall, offset: u64, op: WriteOp<'_>) {
        let Some((r, in_sync)) = call.local.take() else {
            return;
        };
        let l = r.local().expect("local replica");
        let res = match op {
            WriteOp::Write(buf) => l.write_at(self.generation, buf, offset),
            WriteOp::Discard(n) => l.discard(self.generation, offset, n),
        };
        match res {
            Ok(()) => call.held_in_sync += usize::from(in_sync),
            Err(e @ ReplicationError::Fenced { .. }) => call.fenced = Some(e.to_string()),
            Err(e) => call.local_err = Some((r, e)),
        }
    }

    /// The second half of a write, once every replica answered: record
    /// what failed, and whether the write is held. Releases its range.
    fn end_write(&self, call: WriteCall) -> Result<(), EngineError> {
        let (offset, len) = (call.offset, call.len);
        if let Some(why) = &call.fenced {
            self.fence(why);
            return Err(self.fenced_error());
        }
        for (r, epoch) in &call.failed {
            self.replica_failed(r, Some(*epoch), |t| t.mark_dirty(offset, len))?;
        }
        for r in &call.record {
            self.replica_failed(r, None, |_| {})?;
        }
        if let Some((r, e)) = call.local_err {
            self.local_failed(&r, e, call.held_in_sync, |t| t.mark_dirty(offset, len))?;
        }
        if call.held_in_sync == 0 {
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

/// A write between [`Inner::begin_write`] and [`Inner::end_write`].
pub(super) struct WriteCall {
    offset: u64,
    len: u64,
    /// Its range, locked until the call is dropped.
    _range: OwnedRange,
    _counted: Counted,
    inflight: Inflight,
    /// The local replica, while its copy is not written yet.
    local: Option<(Arc<Replica>, bool)>,
    /// Replicas that missed it and must be recorded outdated.
    record: Vec<Arc<Replica>>,
    /// In-sync replicas that hold it.
    held_in_sync: usize,
    /// A replica said this node was fenced.
    fenced: Option<String>,
    local_err: Option<(Arc<Replica>, ReplicationError)>,
    /// Remote replicas that failed it, with their link's epoch.
    failed: Vec<(Arc<Replica>, u64)>,
}

impl WriteCall {
    /// A remote replica's answer.
    fn settle(&mut self, sent: Sent, res: Result<Reply, CallError>, volume: &str) {
        let r = sent.replica;
        match res {
            Ok(Reply::Ok) => {
                r.cell.lock().track.acked(sent.epoch, self.offset, self.len);
                self.held_in_sync += usize::from(sent.in_sync);
            }
            Err(e) if e.is_fenced() => self.fenced = Some(format!("replica {}: {e}", r.node)),
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "unexpected reply".into(),
                };
                tracing::warn!(volume = %volume, peer = %r.node, error = %why,
                    "write to replica failed");
                self.failed.push((r, sent.epoch));
            }
        }
    }

    /// Nothing but acknowledgements: [`Inner::end_write`] will not block.
    fn clean(&self) -> bool {
        self.fenced.is_none()
            && self.failed.is_empty()
            && self.record.is_empty()
            && self.local_err.is_none()
    }
}

/// One in a count of writes in flight, until dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A remote replica a write was routed to.
pub(super) struct Sent {
    replica: Arc<Replica>,
    epoch: u64,
    in_sync: bool,
}

/// A remote replica a write goes to, and its link (`None`: down).
pub(super) struct Routed {
    sent: Sent,
    link: Option<Arc<Link>>,
}

/// A write begun, and where it goes.
type Begun = (WriteCall, Vec<Routed>);

/// A write of [`Inner::replicate_then`], shared by the callbacks of its
/// replicas' replies and the thread that wrote the local copy.
struct PendingWrite {
    inner: Arc<Inner>,
    state: Mutex<PendingState>,
}

struct PendingState {
    /// Set by the writing thread when the local copy is written.
    call: Option<WriteCall>,
    /// Replies still to come: the remote replicas, and the local copy.
    answers: Vec<(Sent, Result<Reply, CallError>)>,
    left: usize,
    done: Option<WriteDone>,
}

impl PendingWrite {
    /// One share of the write came: a remote reply (`answer`), or the
    /// call itself once the writing thread wrote the local copy. The last
    /// one ends the write. When a replica failed and the last share is a
    /// reply, on a thread of its own: recording a replica's state may wait
    /// on the cluster store, and a link's reader must not wait.
    fn settle(
        self: &Arc<Self>,
        answer: Option<(Sent, Result<Reply, CallError>)>,
        call: Option<WriteCall>,
    ) {
        let on_writer = call.is_some();
        let (mut call, answers, done) = {
            let mut s = self.state.lock();
            if let Some(a) = answer {
                s.answers.push(a);
            }
            if call.is_some() {
                s.call = call;
            }
            s.left -= 1;
            if s.left > 0 {
                return;
            }
            let call = s.call.take().expect("the writer's share came");
            let done = s.done.take().expect("a write ends once");
            (call, std::mem::take(&mut s.answers), done)
        };
        let inner = &self.inner;
        for (sent, res) in answers {
            call.settle(sent, res, &inner.volume);
        }
        if on_writer || call.clean() {
            return done(inner.end_write(call));
        }
        let job = Arc::new(Mutex::new(Some((inner.clone(), call, done))));
        let take = job.clone();
        let spawned = std::thread::Builder::new()
            .name("mirror-fail".into())
            .spawn(move || {
                if let Some((inner, call, done)) = take.lock().take() {
                    done(inner.end_write(call));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(volume = %inner.volume, error = %e,
                "no thread to record a failed replica: recording it on the link's reader");
            if let Some((inner, call, done)) = job.lock().take() {
                done(inner.end_write(call));
            }
        }
    }
}

#[derive(Debug)]
pub(super) enum ReadError {
    Engine(EngineError),
    NoSource(String),
}
