//! The comparison of the replicas: after an attach that ended unreleased
//! the extents active in some log, on request (DRBD's online verify) the
//! whole device, compared with the replica reads come from and copied
//! where they differ.

use super::*;

impl Inner {
    /// After an attach that ended unreleased, writes then in flight may
    /// have reached some replicas only (none was acknowledged). Make the
    /// in-sync replicas equal again: compare each with the one reads come
    /// from, a chunk at a time under its range lock (digests over the
    /// network, not data), and copy the chunk where it differs. DRBD
    /// bounds this with an activity log, and so does this: only the
    /// extents active in some replica's log are compared (the whole device
    /// when a log cannot be read). In the background, while the volume is
    /// in use.
    pub(super) fn verify(&self) {
        let requested = self.verification.lock().is_some_and(|v| v.requested);
        let ranges = if requested {
            vec![(0, self.size)]
        } else {
            self.to_verify()
        };
        let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        if let Some(v) = self.verification.lock().as_mut() {
            v.total_bytes = total;
        }
        if requested {
            tracing::info!(volume = %self.volume, bytes = total, "comparing the replicas, as asked");
        } else {
            tracing::info!(volume = %self.volume, bytes = total, of = self.size,
                "comparing the extents the replicas' activity logs name");
        }
        let mut buf = Vec::new();
        let mut pace = Pacer::new(self.resync, Instant::now(), self.app_ios());
        let mut ranges = ranges.into_iter();
        let (mut offset, mut end) = ranges.next().unwrap_or((0, 0));
        loop {
            if offset >= end {
                match ranges.next() {
                    Some((s, e)) => (offset, end) = (s, e),
                    None => break,
                }
                continue;
            }
            if self.is_closed() || self.is_fenced() {
                return;
            }
            let wait = pace.wait(Instant::now(), self.app_ios());
            if !wait.is_zero() {
                std::thread::sleep(wait.min(MAX_BACKOFF));
                continue;
            }
            let len = VERIFY_CHUNK.min(end - offset);
            match self.verify_chunk(offset, len, &mut buf) {
                Some(repaired) => {
                    pace.add(len);
                    if let Some(v) = self.verification.lock().as_mut() {
                        v.done_bytes += len;
                        v.repaired_bytes += repaired;
                    }
                    offset += len;
                }
                // No replica to compare against now: later.
                None => std::thread::sleep(MAX_BACKOFF),
            }
        }
        let mut v = self.verification.lock();
        let Some(v) = v.as_mut() else { return };
        v.finished = true;
        tracing::info!(
            volume = %self.volume,
            compared_bytes = v.done_bytes,
            repaired_bytes = v.repaired_bytes,
            requested = v.requested,
            "replicas verified"
        );
    }

    /// The byte ranges to compare after an unreleased attach: the extents
    /// active in the activity log of any replica reads may come from (each
    /// marked its extents before a write changed them), merged; the whole
    /// device when one of them cannot tell (not connected, an older log).
    fn to_verify(&self) -> Vec<(u64, u64)> {
        let whole = vec![(0, self.size)];
        let mut union = vec![0u64; activity::extents(self.size).div_ceil(64) as usize];
        let deadline = Instant::now() + self.io_timeout;
        for r in self.set().iter() {
            {
                let mut cell = r.cell.lock();
                if !cell.track.readable() {
                    // Its log is not read: a write in flight may have
                    // reached it alone. Compared once back, where its own
                    // log or the others' say (Inner::narrow).
                    cell.track.in_doubt();
                    continue;
                }
            }
            let Some((_, words)) = self.activity_of(r, deadline) else {
                tracing::info!(volume = %self.volume, peer = %r.node,
                    "cannot read this replica's activity log: comparing the whole device");
                return whole;
            };
            for (u, w) in union.iter_mut().zip(words) {
                *u |= w;
            }
        }
        self.extent_ranges(&union)
    }

    /// Compare one chunk; the bytes repaired, or `None` if no replica can
    /// be read now.
    fn verify_chunk(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Option<u64> {
        let (s, e) = unit_span(offset, len);
        let _range = self.ranges.lock(s, e);
        buf.resize(len as usize, 0);
        // The replica reads come from is the reference.
        let src = match self.read_from_in_sync(None, buf, offset) {
            Ok(src) => src,
            Err(e) => {
                tracing::debug!(volume = %self.volume, error = ?e, "verify: no replica to read");
                return None;
            }
        };
        let mut repaired = 0;
        for r in self.set().iter() {
            if Arc::ptr_eq(r, &src) {
                continue;
            }
            let (epoch, link) = {
                let mut cell = r.cell.lock();
                if !cell.track.readable() {
                    // Not compared (out of sync, or a resync copied this
                    // chunk before the others were made equal): copied.
                    cell.track.mark_dirty(offset, len);
                    continue;
                }
                (cell.track.epoch(), cell.link.clone())
            };
            // A peer without a link: its own thread reconnects and resyncs it.
            if !r.is_local() && link.is_none() {
                continue;
            }
            if self.holds(r, link.as_deref(), buf, offset) {
                continue;
            }
            tracing::warn!(volume = %self.volume, peer = %r.node, from = %src.node, offset, len,
                "replica differs from the one reads come from: repairing it");
            match self.copy_to(r, link.as_deref(), buf, offset) {
                Ok(_) => repaired += len,
                Err(e) => {
                    tracing::warn!(volume = %self.volume, peer = %r.node, error = %e, "verify: repair failed");
                    let _ = self.replica_failed(r, Some(epoch), |t| t.mark_dirty(offset, len));
                }
            }
        }
        Some(repaired)
    }

    /// Whether replica `r` holds `buf` at `offset` already (by digest; an
    /// error says no, and the copy that follows meets it).
    pub(super) fn holds(&self, r: &Replica, link: Option<&Link>, buf: &[u8], offset: u64) -> bool {
        let want = Sha256::digest(buf);
        let have = match (r.local(), link) {
            (Some(l), _) => {
                let mut mine = vec![0u8; buf.len()];
                match l.read_at(self.generation, &mut mine, offset) {
                    Ok(()) => Sha256::digest(&mine).to_vec(),
                    Err(_) => return false,
                }
            }
            (None, Some(link)) => {
                let req = Request::Digest {
                    offset,
                    len: buf.len() as u32,
                };
                match link.call(req, Instant::now() + self.io_timeout) {
                    Ok(Reply::Data(d)) => d,
                    _ => return false,
                }
            }
            (None, None) => return false,
        };
        have[..] == want[..]
    }
}

impl Mirror {
    /// Compare every in-sync replica with the one reads come from over the
    /// whole device, in the background while the volume is in use, and
    /// copy the chunks that differ (DRBD's online verify, which marks them
    /// for its next resync). Refused while a comparison runs.
    pub fn start_verify(&self) -> Result<(), ReplicationError> {
        let mut workers = self.workers.lock();
        self.inner.check_open().map_err(ReplicationError::Engine)?;
        {
            let mut v = self.inner.verification.lock();
            if v.is_some_and(|v| !v.finished) {
                return Err(ReplicationError::VerifyRunning(self.inner.volume.clone()));
            }
            *v = Some(Verification {
                total_bytes: self.inner.size,
                requested: true,
                ..Verification::default()
            });
        }
        let t = self.inner.spawn(Job::Verify)?;
        workers.push((None, t));
        Ok(())
    }
}
