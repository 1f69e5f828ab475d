//! Attach ownership: a key under the holder's lease whose revision is the
//! volume's generation (the fencing token every replica checks).

use super::*;

impl Shared {
    async fn try_attach(
        &self,
        volume_id: &str,
        volume: &str,
        lease: i64,
        resync: bool,
    ) -> Result<AttachTry, ClusterError> {
        let key = attach_key(volume_id);
        let value = to_json(&AttachRecord {
            node: self.node.clone(),
            volume: volume.to_string(),
            resync,
        });
        let put = || {
            TxnOp::put(
                key.as_str(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        // Take it if free, else read the holder: one round trip.
        let resp = self
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([put()])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await?;
        if resp.succeeded() {
            return Ok(AttachTry::Got(txn_revision(&resp)));
        }
        let Some(kv) = txn_kvs(&resp, 0).into_iter().next() else {
            return Ok(AttachTry::Again);
        };
        let holder: AttachRecord = parse(&kv)?;
        if holder.node == self.node {
            if kv.lease() == lease {
                // This node's resync and an attach never share a generation.
                if holder.resync != resync {
                    return Ok(AttachTry::Busy {
                        node: holder.node,
                        up: true,
                        resync: holder.resync,
                    });
                }
                return Ok(AttachTry::Got(kv.mod_revision() as Generation));
            }
            // An earlier run of this node attached it: take it over under
            // the current lease, as a new generation that fences the old.
            let resp = self
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then([put()]),
                )
                .await?;
            return Ok(if resp.succeeded() {
                AttachTry::Got(txn_revision(&resp))
            } else {
                AttachTry::Again
            });
        }
        // The holder is alive if its member key is under the very lease that
        // holds the attach key; if it restarted, its old lease is dying.
        let member = self.get(&node_key(&holder.node)).await?;
        let up = member.is_some_and(|m| m.lease() == kv.lease());
        Ok(AttachTry::Busy {
            node: holder.node,
            up,
            resync: holder.resync,
        })
    }
}

impl Cluster {
    /// Take attach ownership of a volume. If another node holds it and that
    /// node's member key is gone, wait up to `wait` for its (lease-backed)
    /// attach key to expire, then take it. Err(HeldBy) naming the holder
    /// otherwise. Re-acquire by the same node returns the current generation
    /// (a new one if an earlier run of this node held it).
    pub fn acquire_attach(
        &self,
        volume_id: &str,
        volume: &str,
        wait: Duration,
    ) -> Result<Generation, ClusterError> {
        self.acquire(volume_id, volume, wait, false)
    }

    /// The attach for a background resync of a volume attached nowhere:
    /// like an attach (its generation fences older ones), but any attach
    /// may ask it to give way ([`ClusterError::HeldForResync`]).
    pub fn acquire_attach_for_resync(
        &self,
        volume_id: &str,
        volume: &str,
    ) -> Result<Generation, ClusterError> {
        self.acquire(volume_id, volume, Duration::ZERO, true)
    }

    fn acquire(
        &self,
        volume_id: &str,
        volume: &str,
        wait: Duration,
        resync: bool,
    ) -> Result<Generation, ClusterError> {
        let deadline = Instant::now() + wait;
        let mut races = 0;
        loop {
            let lease = self.live_lease()?;
            let (vid, vol) = (volume_id.to_string(), volume.to_string());
            let got =
                self.run(move |s| async move { s.try_attach(&vid, &vol, lease, resync).await })?;
            match got {
                AttachTry::Got(generation) => {
                    debug!(volume, generation, "attach acquired");
                    return Ok(generation);
                }
                AttachTry::Again => {
                    races += 1;
                    if races == 20 {
                        return Err(ClusterError::Etcd(format!(
                            "the attach key of volume {volume} kept changing while this node took it; retry"
                        )));
                    }
                }
                AttachTry::Busy { node, up, resync } => {
                    let now = Instant::now();
                    if up && resync {
                        return Err(ClusterError::HeldForResync {
                            volume: volume.to_string(),
                            node,
                        });
                    }
                    if up || now >= deadline {
                        return Err(ClusterError::HeldBy {
                            volume: volume.to_string(),
                            node,
                        });
                    }
                    std::thread::sleep(ATTACH_POLL.min(deadline - now));
                }
            }
        }
    }

    /// Record that the attach at `generation` (which this node holds) is
    /// not released yet, and say whether an earlier one never was: its
    /// node was killed or cut off, so writes it had in flight may have
    /// reached some replicas only. Fenced if `generation` lost the attach.
    pub fn mark_unreleased(
        &self,
        volume_id: &str,
        generation: Generation,
    ) -> Result<bool, ClusterError> {
        let mark = unreleased_key(volume_id);
        let txn = while_holding(volume_id, generation).and_then([
            TxnOp::get(mark.as_str(), None),
            TxnOp::put(mark.as_str(), generation.to_string(), None),
        ]);
        let resp = self.run(move |s| async move { s.txn(txn).await })?;
        if !resp.succeeded() {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        // Set by this very attach (taken again by the same daemon): released since.
        let earlier = txn_kvs(&resp, 0)
            .first()
            .map(|kv| kv.value_str().ok() != Some(generation.to_string().as_str()));
        Ok(earlier.unwrap_or(false))
    }

    /// The generation of the last attach not released cleanly (its node
    /// was killed or cut off), if any: a clean release and every other
    /// node's attach since change it.
    pub fn unreleased(&self, volume_id: &str) -> Result<Option<Generation>, ClusterError> {
        let mark = unreleased_key(volume_id);
        let kv = self.run(|s| async move { s.get(&mark).await })?;
        Ok(kv.and_then(|kv| kv.value_str().ok().and_then(|v| v.parse().ok())))
    }

    /// Give up attach ownership, if `generation` still holds it. Releasing a
    /// volume nobody holds is fine; one held at another generation is Fenced.
    pub fn release_attach(
        &self,
        volume_id: &str,
        generation: Generation,
    ) -> Result<(), ClusterError> {
        self.release(volume_id, generation, true)
    }

    /// [`Self::release_attach`], but the unreleased mark an earlier attach
    /// left stays: this attach did not finish comparing the replicas, so
    /// the next one must.
    pub fn release_attach_unverified(
        &self,
        volume_id: &str,
        generation: Generation,
    ) -> Result<(), ClusterError> {
        self.release(volume_id, generation, false)
    }

    pub(super) fn release(
        &self,
        volume_id: &str,
        generation: Generation,
        clear_mark: bool,
    ) -> Result<(), ClusterError> {
        let (key, mark) = (attach_key(volume_id), unreleased_key(volume_id));
        let mut ops = vec![TxnOp::delete(key.as_str(), None)];
        if clear_mark {
            ops.push(TxnOp::delete(mark.as_str(), None));
        }
        let txn = while_holding(volume_id, generation)
            .and_then(ops)
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.run(move |s| async move { s.txn(txn).await })?;
        if resp.succeeded() || txn_kvs(&resp, 0).is_empty() {
            return Ok(());
        }
        Err(ClusterError::Fenced {
            volume: volume_id.to_string(),
            generation,
        })
    }

    /// Who holds the volume, at which generation (a background resync
    /// included: see [`Cluster::attach_owner`]).
    pub fn attach_holder(&self, volume_id: &str) -> Result<Option<Holder>, ClusterError> {
        let key = attach_key(volume_id);
        let kv = self.run(|s| async move { s.get(&key).await })?;
        kv.map(|kv| {
            parse::<AttachRecord>(&kv).map(|r| Holder {
                node: r.node,
                generation: kv.mod_revision() as Generation,
                resync: r.resync,
            })
        })
        .transpose()
    }

    /// Delete a resync attach of this node that no resync job holds any
    /// more (its release failed, and this node's lease lives on). Only that
    /// record, at that revision: never an attach. Whether one was deleted.
    pub fn drop_stale_resync_attach(&self, volume_id: &str) -> Result<bool, ClusterError> {
        let key = attach_key(volume_id);
        let k = key.clone();
        let Some(kv) = self.run(|s| async move { s.get(&k).await })? else {
            return Ok(false);
        };
        let r: AttachRecord = parse(&kv)?;
        if r.node != self.shared.node || !r.resync {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })
    }

    /// The node the volume is attached on, and its generation: `None`
    /// when nothing holds it or a background resync does.
    pub fn attach_owner(
        &self,
        volume_id: &str,
    ) -> Result<Option<(String, Generation)>, ClusterError> {
        Ok(self
            .attach_holder(volume_id)?
            .filter(|h| !h.resync)
            .map(|h| (h.node, h.generation)))
    }
}

enum AttachTry {
    Got(Generation),
    /// Held by `node`; `up` when that holder's lease is the one alive now.
    Busy {
        node: String,
        up: bool,
        resync: bool,
    },
    /// Changed under us; look again.
    Again,
}
