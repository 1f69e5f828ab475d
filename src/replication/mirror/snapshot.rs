//! Snapshots taken and deleted on every replica at one point of the writes.

use super::*;

impl Inner {
    pub(super) fn snapshot(&self, name: &str) -> Result<TakenFrom, ReplicationError> {
        self.check_open()?;
        let (s, e) = unit_span(0, self.size);
        // Waits for every write in flight and holds off new ones (resync
        // and verification copies included).
        let _all = self.ranges.lock(s, e);
        self.check_open()?;
        if self.verification.lock().is_some_and(|v| !v.finished) {
            // The attached node's mirror runs the comparison: name it.
            return Err(self.snapshot_refused(
                "take",
                name,
                &self.hello.from,
                "still being compared with the others after an attach that ended unreleased (`dunnage volume inspect` shows the verification)",
            ));
        }
        self.snapshot_op("take", name, Request::Snapshot { name: name.into() })
    }

    pub(super) fn delete_snapshot(&self, name: &str) -> Result<(), ReplicationError> {
        self.check_open()?;
        self.snapshot_op(
            "delete",
            name,
            Request::DeleteSnapshot { name: name.into() },
        )
        .map(drop)
    }

    fn snapshot_refused(
        &self,
        op: &'static str,
        name: &str,
        node: &str,
        why: &str,
    ) -> ReplicationError {
        ReplicationError::SnapshotNeedsAll {
            op,
            volume: self.volume.clone(),
            snapshot: name.into(),
            node: node.into(),
            why: why.into(),
        }
    }

    /// Run a snapshot request on every replica at once; a take that fails
    /// anywhere is undone where it succeeded. A delete that finds no
    /// snapshot on a replica counts as done there.
    fn snapshot_op(
        &self,
        op: &'static str,
        name: &str,
        req: Request,
    ) -> Result<TakenFrom, ReplicationError> {
        let take = matches!(req, Request::Snapshot { .. });
        let set = self.set();
        let mut links = Vec::new();
        let mut taken_from = Vec::new();
        for r in set.iter() {
            let cell = r.cell.lock();
            taken_from.push((r.node.clone(), cell.incarnation));
            let state = cell.track.state();
            if take && state != ReplicaState::InSync {
                return Err(self.snapshot_refused(op, name, &r.node, &state.to_string()));
            }
            if !r.is_local() {
                match &cell.link {
                    Some(l) if cell.track.connected() => links.push((r.node.as_str(), l.clone())),
                    _ => return Err(self.snapshot_refused(op, name, &r.node, "unreachable")),
                }
            }
        }
        // Taking one copies the replica's map: allow for a big one.
        let deadline = Instant::now() + handshake_timeout(self.io_timeout);
        let tickets: Vec<_> = links
            .iter()
            .map(|(node, l)| (*node, l.submit(req.clone())))
            .collect();
        let mut done = Vec::new();
        let mut failed = None;
        if let Some(l) = self.local_replica() {
            let res = if take {
                l.snapshot(self.generation, name)
            } else {
                l.delete_snapshot(self.generation, name)
            };
            match res {
                Ok(()) => done.push(None),
                Err(ReplicationError::Engine(EngineError::NoSuchSnapshot { .. })) if !take => {}
                Err(e) => failed = Some(e),
            }
        }
        for ((node, link), (_, ticket)) in links.iter().zip(tickets) {
            let res = match ticket {
                Ok(t) => t.wait(deadline),
                Err(_) => Err(CallError::Down),
            };
            let err = match res {
                Ok(Reply::Ok) => {
                    done.push(Some(link.clone()));
                    continue;
                }
                Err(CallError::Refused { code, .. }) if code == ErrorCode::NotFound && !take => {
                    continue
                }
                Err(CallError::Refused { code, message }) => ReplicationError::Refused {
                    node: node.to_string(),
                    code,
                    message,
                },
                Ok(_) => {
                    self.snapshot_refused(op, name, node, "answering with an unexpected reply")
                }
                Err(e) => self.snapshot_refused(op, name, node, &format!("not answering ({e})")),
            };
            failed.get_or_insert(err);
        }
        let Some(err) = failed else {
            tracing::info!(volume = %self.volume, snapshot = name, op, "snapshot done on every replica");
            return Ok(taken_from);
        };
        if take {
            // Undo, so that no replica keeps a snapshot the others lack.
            let undo = Request::DeleteSnapshot { name: name.into() };
            for link in done {
                let res =
                    match link {
                        None => self
                            .local_replica()
                            .map_or(Ok(()), |l| l.delete_snapshot(self.generation, name)),
                        Some(l) => l.call(undo.clone(), deadline).map(drop).map_err(|e| {
                            ReplicationError::Io {
                                op: "delete the partial snapshot on",
                                path: PathBuf::from(&self.volume),
                                source: std::io::Error::other(e.to_string()),
                            }
                        }),
                    };
                if let Err(e) = res {
                    tracing::warn!(volume = %self.volume, snapshot = name, error = %e,
                        "could not delete a snapshot that failed on another replica");
                }
            }
        }
        if matches!(
            &err,
            ReplicationError::Fenced { .. }
                | ReplicationError::Refused {
                    code: ErrorCode::Fenced,
                    ..
                }
        ) {
            self.fence("a replica has seen a newer generation");
        }
        Err(err)
    }

    fn local_replica(&self) -> Option<Arc<LocalReplica>> {
        self.set().iter().find_map(|r| r.local().cloned())
    }
}
