//! Upkeep of the replicas' activity logs: clearing the extents no write
//! has touched for a while, once every replica is in sync and flushed.

use super::*;

impl Inner {
    /// Keep the replicas' activity logs to what may differ, so that an
    /// unreleased attach makes the next compare little. Once no comparison
    /// is due (none was, or it is done), clear every extent this attach
    /// has not written (what earlier attaches left; again whenever a
    /// resync brought a replica in sync, its copies marked what they
    /// wrote); then, woken by a flush that finds more than the most
    /// active, the least recently written ones.
    pub(super) fn keep_activity(&self) {
        let mut swept = false;
        loop {
            if self.is_closed() || self.is_fenced() {
                return;
            }
            let due = self.verification.lock().is_some_and(|v| !v.finished);
            if due || !self.all_in_sync() {
                // The logs say what to compare, or what a replica misses:
                // swept once that is done.
                swept = false;
            } else {
                if !swept || self.resweep.swap(false, Ordering::AcqRel) {
                    for (first, count) in self.hot.cold_runs() {
                        let cold = |hot: &Hot| (first..first + count).all(|e| !hot.is_active(e));
                        if !self.clear_extents(first, count, cold) {
                            return;
                        }
                    }
                    swept = true;
                }
                let tick = self.hot.now();
                for e in self.hot.victims() {
                    if !self.clear_extents(e, 1, |hot| !hot.written_since(e, tick)) {
                        return;
                    }
                }
            }
            let _ = self.nudge.1.recv_timeout(MAX_BACKOFF);
        }
    }

    /// Clear `count` extents from `first` in `r`'s activity log.
    fn deactivate_on(
        &self,
        r: &Replica,
        first: u64,
        count: u64,
        seq: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        if let Some(l) = r.local() {
            return l
                .deactivate(self.generation, first, count, seq)
                .map_err(|e| e.to_string());
        }
        let Some(link) = r.cell.lock().link.clone() else {
            return Err("not connected".into());
        };
        match link.call(Request::Deactivate { first, count, seq }, deadline) {
            Ok(Reply::Ok) => Ok(()),
            Ok(_) => Err("unexpected reply".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Clear `count` extents from `first` in every replica's activity log,
    /// under their range lock: no write to them is in flight, and once
    /// every replica is flushed and in sync they hold the same there,
    /// durably. Skipped unless `still` holds under the lock, and while a
    /// replica is out of sync ([`Inner::all_in_sync`]). False once the
    /// mirror is closed or fenced.
    fn clear_extents(&self, first: u64, count: u64, still: impl Fn(&Hot) -> bool) -> bool {
        if self.is_closed() || self.is_fenced() {
            return false;
        }
        let (start, end) = (first * EXTENT, ((first + count) * EXTENT).min(self.size));
        if start >= end {
            return true;
        }
        let (s, e) = unit_span(start, end - start);
        let _range = self.ranges.lock(s, e);
        if !still(&self.hot) || !self.all_in_sync() {
            return true;
        }
        // A write a replica acknowledged but has not synced would be lost
        // with its node, and then lie in no log.
        if let Err(e) = self.flush() {
            tracing::debug!(volume = %self.volume, error = %e, "activity logs kept: a flush failed");
            return true;
        }
        if !self.all_in_sync() {
            return true;
        }
        let deadline = Instant::now() + self.io_timeout;
        let seq = self.clears.fetch_add(1, Ordering::Relaxed) + 1;
        for r in self.set().iter() {
            if let Err(e) = self.deactivate_on(r, first, count, seq, deadline) {
                tracing::debug!(volume = %self.volume, peer = %r.node, first, count, error = %e,
                    "activity log not cleared there");
            }
        }
        for e in first..first + count {
            self.hot.cleared(e);
        }
        true
    }

    /// Replica `r`'s activity log, if it can be read.
    pub(super) fn activity_of(
        &self,
        r: &Replica,
        deadline: Instant,
    ) -> Option<(activity::Stamp, Vec<u64>)> {
        if let Some(l) = r.local() {
            return l.activity_stamped(self.generation).ok();
        }
        let link = r.cell.lock().link.clone()?;
        match link.call(Request::Activity, deadline) {
            Ok(Reply::Data(bytes)) => activity::decode_reply(&bytes, activity::extents(self.size)),
            _ => None,
        }
    }

    /// The byte ranges of the extents set in `bitmap`, merged.
    pub(super) fn extent_ranges(&self, bitmap: &[u64]) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for e in activity::set_bits(bitmap) {
            let (s, end) = (e * EXTENT, ((e + 1) * EXTENT).min(self.size));
            match ranges.last_mut() {
                Some(last) if last.1 == s => last.1 = end,
                _ => ranges.push((s, end)),
            }
        }
        ranges
    }

    /// Every replica is in sync, connected and misses nothing: the only
    /// time extents may be cleared from the activity logs (otherwise they
    /// also record, on disk, what an out-of-sync replica misses).
    fn all_in_sync(&self) -> bool {
        self.set().iter().all(|r| {
            let cell = r.cell.lock();
            cell.track.readable() && cell.track.dirty().is_empty()
        })
    }

    /// The volume is detached cleanly: flush, then clear the activity logs
    /// of the replicas, which hold every acknowledged write. Not while a
    /// comparison is due (the logs say what it must compare), nor while a
    /// replica is out of sync (they say what it misses). Best effort: a
    /// log left set costs the next comparison time, nothing more.
    pub(super) fn settle(&self) {
        if self.is_closed()
            || self.is_fenced()
            || self.verification.lock().is_some_and(|v| !v.finished)
        {
            return;
        }
        let (s, e) = unit_span(0, self.size);
        let _all = self.ranges.lock(s, e);
        if let Err(e) = self.flush() {
            tracing::warn!(volume = %self.volume, error = %e,
                "the last flush failed: activity logs kept");
            return;
        }
        if !self.all_in_sync() {
            tracing::info!(volume = %self.volume,
                "a replica is out of sync: activity logs kept (they record what it misses)");
            return;
        }
        let deadline = Instant::now() + self.io_timeout;
        let seq = self.clears.fetch_add(1, Ordering::Relaxed) + 1;
        for r in self.set().iter() {
            if let Err(e) = self.deactivate_on(r, 0, u64::MAX, seq, deadline) {
                tracing::info!(volume = %self.volume, peer = %r.node, error = %e,
                    "activity log not cleared: the next unreleased attach compares its extents");
            }
        }
    }
}
