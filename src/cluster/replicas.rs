//! Where a volume's replicas are and what state each is in, recorded under
//! the attach that saw it (`put_holding`); placement and replica moves.

use super::*;

impl Cluster {
    /// Every volume in the catalog: its id and its replicas' nodes. Unlike
    /// the catalog's `list`, an error when etcd does not answer (a replica sweep must never take
    /// an unreachable etcd for an empty catalog).
    pub fn volume_replicas(
        &self,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, ClusterError> {
        let prefix = volumes_prefix();
        let kvs = self.run(|s| async move { s.get_prefix(&prefix).await })?;
        let mut out = std::collections::HashMap::new();
        for kv in kvs {
            let r = parse::<crate::catalog::VolumeRecord>(&kv)?;
            out.insert(r.id, r.replicas);
        }
        Ok(out)
    }

    /// Volumes attached nowhere (no attach, no resync) with a replica not
    /// in sync, and the live members' names: one txn, one revision.
    pub fn detached_behind(
        &self,
    ) -> Result<(Vec<Behind>, std::collections::BTreeSet<String>), ClusterError> {
        let (resp, held) = self.read_detached(vec![
            format!("{PREFIX}replicas/"),
            format!("{PREFIX}nodes/"),
        ])?;
        let mut states = states_by_volume(&txn_kvs(&resp, 2));
        let mut behind = Vec::new();
        for kv in txn_kvs(&resp, 0) {
            let Some(r) = skip_bad(parse::<crate::catalog::VolumeRecord>(&kv)) else {
                continue;
            };
            if held.contains(&r.id) {
                continue;
            }
            let b = Behind {
                states: states.remove(&r.id).unwrap_or_default(),
                name: r.name,
                id: r.id,
                replicas: r.replicas,
            };
            if b.is_behind() {
                behind.push(b);
            }
        }
        let mut up = std::collections::BTreeSet::new();
        for kv in txn_kvs(&resp, 3) {
            if let Some(m) = skip_bad(parse::<MemberRecord>(&kv)) {
                up.insert(m.name);
            }
        }
        Ok((behind, up))
    }

    /// Every volume's replicas, replacements, states and attached node,
    /// with the nodes ever known and those up: one txn, one revision (what
    /// the sweep's replacement of a dead node's replicas reads).
    pub fn replicas_everywhere(&self) -> Result<ReplicaMap, ClusterError> {
        let resp = self.run(|s| async move {
            let all = |p: String| TxnOp::get(p, Some(GetOptions::new().with_prefix()));
            let ops = [
                all(volumes_prefix()),
                all(format!("{PREFIX}attach/")),
                all(format!("{PREFIX}replicas/")),
                all(format!("{PREFIX}nodes/")),
                all(format!("{PREFIX}known/")),
                all(format!("{PREFIX}cordoned/")),
            ];
            s.txn(Txn::new().and_then(ops)).await
        })?;
        let mut attached: std::collections::HashMap<String, String> = Default::default();
        for kv in txn_kvs(&resp, 1) {
            let Some(id) = key_tail(&kv, &format!("{PREFIX}attach/")) else {
                continue;
            };
            if let Some(a) = skip_bad(parse::<AttachRecord>(&kv)).filter(|a| !a.resync) {
                attached.insert(id.to_string(), a.node);
            }
        }
        let mut states = states_by_volume(&txn_kvs(&resp, 2));
        let mut volumes = Vec::new();
        for kv in txn_kvs(&resp, 0) {
            let Some(r) = skip_bad(parse::<crate::catalog::VolumeRecord>(&kv)) else {
                continue;
            };
            volumes.push(VolumeReplicas {
                states: states.remove(&r.id).unwrap_or_default(),
                attached_on: attached.remove(&r.id),
                name: r.name,
                id: r.id,
                replicas: r.replicas,
                replacing: r.replacing,
            });
        }
        let names = |range: usize| -> BTreeSet<String> {
            txn_kvs(&resp, range)
                .iter()
                .filter_map(|kv| skip_bad(parse::<MemberRecord>(kv)))
                .map(|m| m.name)
                .collect()
        };
        let cordoned = txn_kvs(&resp, 5)
            .iter()
            .filter_map(|kv| key_tail(kv, &format!("{PREFIX}cordoned/")).map(str::to_string))
            .collect();
        Ok(ReplicaMap {
            volumes,
            known: names(4),
            up: names(3),
            cordoned,
        })
    }

    /// One txn (one revision): the volume records (range 0), the attach keys
    /// (1), then everything under each of `more` (2, 3, …); and the ids
    /// attached or resyncing somewhere.
    fn read_detached(
        &self,
        more: Vec<String>,
    ) -> Result<(TxnResponse, std::collections::HashSet<String>), ClusterError> {
        let resp = self.run(|s| async move {
            let all = |p: String| TxnOp::get(p, Some(GetOptions::new().with_prefix()));
            let mut ops = vec![all(volumes_prefix()), all(format!("{PREFIX}attach/"))];
            ops.extend(more.into_iter().map(all));
            s.txn(Txn::new().and_then(ops)).await
        })?;
        let held = txn_kvs(&resp, 1)
            .iter()
            .filter_map(|kv| key_tail(kv, &format!("{PREFIX}attach/")).map(str::to_string))
            .collect();
        Ok((resp, held))
    }

    /// The volumes attached nowhere (no attach, no resync) with a replica on
    /// `node` whose incarnation is recorded, as (name, id, incarnation):
    /// what `node` compares with its replicas' files.
    pub fn detached_met_on(
        &self,
        node: &str,
    ) -> Result<Vec<(String, String, Incarnation)>, ClusterError> {
        let (resp, held) = self.read_detached(vec![format!("{PREFIX}incarnations/")])?;
        let incarnations = format!("{PREFIX}incarnations/");
        let mut met = std::collections::HashMap::new();
        for kv in txn_kvs(&resp, 2) {
            let Some((id, n)) = key_tail(&kv, &incarnations).and_then(|t| t.split_once('/')) else {
                continue;
            };
            let value = kv.value_str().unwrap_or_default().trim();
            if let (true, Ok(inc)) = (n == node, Incarnation::from_str_radix(value, 16)) {
                met.insert(id.to_string(), inc);
            }
        }
        let mut out = Vec::new();
        for kv in txn_kvs(&resp, 0) {
            let Some(r) = skip_bad(parse::<crate::catalog::VolumeRecord>(&kv)) else {
                continue;
            };
            if held.contains(&r.id) || !r.replicas.iter().any(|n| n == node) {
                continue;
            }
            if let Some(&inc) = met.get(&r.id) {
                out.push((r.name, r.id, inc));
            }
        }
        Ok(out)
    }

    /// The values under `prefix` by the key's last part (a node name),
    /// each read by `value`.
    fn per_node<T>(
        &self,
        prefix: String,
        value: impl Fn(&KeyValue, &str) -> Result<T, ClusterError>,
    ) -> Result<BTreeMap<String, T>, ClusterError> {
        let p = prefix.clone();
        let kvs = self.run(|s| async move { s.get_prefix(&p).await })?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            if let Some(node) = key_tail(&kv, &prefix) {
                out.insert(node.to_string(), value(&kv, node)?);
            }
        }
        Ok(out)
    }

    /// The stored replica states, by node. A node without a stored state is
    /// absent (nothing is assumed about it).
    pub fn replica_states(
        &self,
        volume_id: &str,
    ) -> Result<BTreeMap<String, ReplicaState>, ClusterError> {
        self.per_node(replicas_prefix(volume_id), |kv, _| {
            Ok(parse::<ReplicaRecord>(kv)?.state)
        })
    }

    /// The incarnation recorded for each replica of the volume (hex values).
    pub fn replica_incarnations(
        &self,
        volume_id: &str,
    ) -> Result<BTreeMap<String, Incarnation>, ClusterError> {
        self.per_node(incarnations_prefix(volume_id), |kv, node| {
            let text = kv.value_str().unwrap_or_default().trim();
            // Unreadable: recorded, but no image's (0), so the replica is
            // resynced whole rather than every attach refused.
            Ok(Incarnation::from_str_radix(text, 16).unwrap_or_else(|_| {
                warn!(
                    volume_id,
                    node,
                    value = text,
                    "unreadable replica incarnation in etcd: taking the replica for another image"
                );
                0
            }))
        })
    }

    /// Record the incarnation of `node`'s replica, only while the volume's
    /// attach key is still at `generation` (Err(Fenced) otherwise). A
    /// `replaced` one (another image than recorded) holds no snapshot: in
    /// the same transaction, `node` leaves the snapshot records.
    pub fn set_replica_incarnation(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        incarnation: Incarnation,
        replaced: bool,
    ) -> Result<(), ClusterError> {
        let key = format!("{}{node}", incarnations_prefix(volume_id));
        let what = || {
            format!("the snapshot records of volume {volume_id}, read to record node {node}'s replica replaced,")
        };
        self.txn_holding(volume_id, generation, what, || {
            let (mut ops, when) = if replaced {
                self.snapshots_without(volume_id, node)?
            } else {
                (Vec::new(), Vec::new())
            };
            ops.push(TxnOp::put(
                key.as_str(),
                format!("{incarnation:016x}"),
                None,
            ));
            Ok((ops, when, ()))
        })
    }

    /// Record `node`'s replica state, only while the volume's attach key is
    /// still at `generation` (Err(Fenced) otherwise), in one etcd txn.
    pub fn set_replica_state(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        state: ReplicaState,
    ) -> Result<(), ClusterError> {
        let key = format!("{}{node}", replicas_prefix(volume_id));
        let value = to_json(&ReplicaRecord { state, generation });
        self.put_holding(volume_id, generation, TxnOp::put(key, value, None))
    }

    /// Record that the attach at `generation` reached every replica then
    /// in sync (see `reached_key`).
    pub fn set_reached(&self, volume_id: &str, generation: Generation) -> Result<(), ClusterError> {
        let op = TxnOp::put(reached_key(volume_id), generation.to_string(), None);
        self.put_holding(volume_id, generation, op)
    }

    /// The generation [`Self::set_reached`] recorded last; 0 if none (or
    /// unreadable: then no replica is taken for rolled back).
    pub fn reached(&self, volume_id: &str) -> Result<Generation, ClusterError> {
        let key = reached_key(volume_id);
        let Some(kv) = self.run(|s| async move { s.get(&key).await })? else {
            return Ok(0);
        };
        let text = kv.value_str().unwrap_or_default().trim();
        Ok(text.parse().unwrap_or_else(|_| {
            warn!(
                volume_id,
                value = text,
                "unreadable reached generation in etcd: ignored"
            );
            0
        }))
    }

    /// `dunnage replica accept`: while `generation` holds the attach,
    /// record `node`'s replica in sync and every other one outdated, in one
    /// transaction. The others' incarnations are forgotten, so that the
    /// next attach copies them whole: their activity logs may have been
    /// cleared of writes the accepted replica lacks. So is the reached
    /// generation: the accepted replica may have seen an older one.
    pub fn accept_replica(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        others: &[String],
    ) -> Result<(), ClusterError> {
        if generation == 0 {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        let record = |state| to_json(&ReplicaRecord { state, generation });
        let mut ops = vec![
            TxnOp::put(
                format!("{}{node}", replicas_prefix(volume_id)),
                record(ReplicaState::InSync),
                None,
            ),
            TxnOp::delete(reached_key(volume_id), None),
        ];
        for n in others {
            ops.push(TxnOp::put(
                format!("{}{n}", replicas_prefix(volume_id)),
                record(ReplicaState::Outdated),
                None,
            ));
            ops.push(TxnOp::delete(
                format!("{}{n}", incarnations_prefix(volume_id)),
                None,
            ));
        }
        let txn = while_holding(volume_id, generation).and_then(ops);
        if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
            Ok(())
        } else {
            Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            })
        }
    }

    /// Unguarded initial states at create time (all InSync for a new, empty volume).
    pub fn init_replica_states(
        &self,
        volume_id: &str,
        nodes: &[String],
    ) -> Result<(), ClusterError> {
        let ops: Vec<TxnOp> = nodes
            .iter()
            .map(|n| {
                TxnOp::put(
                    format!("{}{n}", replicas_prefix(volume_id)),
                    to_json(&ReplicaRecord {
                        state: ReplicaState::InSync,
                        generation: 0,
                    }),
                    None,
                )
            })
            .collect();
        self.run(|s| async move { s.txn(Txn::new().and_then(ops)).await })?;
        Ok(())
    }

    /// Delete the volume's replica states and snapshot records (at volume
    /// remove).
    pub fn forget_volume(&self, volume_id: &str) -> Result<(), ClusterError> {
        let prefixes = [
            replicas_prefix(volume_id),
            snapshots_prefix(volume_id),
            incarnations_prefix(volume_id),
        ];
        let keys = [unreleased_key(volume_id), reached_key(volume_id)];
        self.run(|s| async move {
            let mut kv = s.client.kv_client();
            for prefix in prefixes {
                kv.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                    .await
                    .map_err(|e| s.error(e))?;
            }
            for key in keys {
                kv.delete(key, None).await.map_err(|e| s.error(e))?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Run the transaction `attempt` builds (its operations, the compares
    /// that hold it to the keys it read, and what to answer) only while
    /// `generation` holds the volume's attach: built again while only
    /// those keys changed meanwhile, Err(Fenced) once the attach moved.
    /// `what` says what kept changing after the last try.
    pub(super) fn txn_holding<T>(
        &self,
        volume_id: &str,
        generation: Generation,
        what: impl FnOnce() -> String,
        mut attempt: impl FnMut() -> Result<(Vec<TxnOp>, Vec<Compare>, T), ClusterError>,
    ) -> Result<T, ClusterError> {
        const TRIES: usize = 20;
        let fenced = || ClusterError::Fenced {
            volume: volume_id.to_string(),
            generation,
        };
        // A missing key compares as revision 0: never a valid guard.
        if generation == 0 {
            return Err(fenced());
        }
        for _ in 0..TRIES {
            let (ops, mut when, answer) = attempt()?;
            when.push(Compare::mod_revision(
                attach_key(volume_id),
                CompareOp::Equal,
                generation as i64,
            ));
            let txn = Txn::new().when(when).and_then(ops);
            if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
                return Ok(answer);
            }
            if self.attach_holder(volume_id)?.map(|h| h.generation) != Some(generation) {
                return Err(fenced());
            }
        }
        Err(ClusterError::Etcd(format!(
            "{} kept changing under {TRIES} attempts; retry",
            what()
        )))
    }

    /// Run `op` only while `generation` holds the volume's attach
    /// (Err(Fenced) otherwise).
    pub(super) fn put_holding(
        &self,
        volume_id: &str,
        generation: Generation,
        op: TxnOp,
    ) -> Result<(), ClusterError> {
        let fenced = || ClusterError::Fenced {
            volume: volume_id.to_string(),
            generation,
        };
        // A missing key compares as revision 0: never a valid guard.
        if generation == 0 {
            return Err(fenced());
        }
        let txn = while_holding(volume_id, generation).and_then([op]);
        let ok = self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })?;
        if ok {
            Ok(())
        } else {
            Err(fenced())
        }
    }

    /// Add `change`'s node to volume `name`'s replicas, or remove it, while
    /// `generation` holds the attach: the catalog record (`repl` follows)
    /// and the replica's state in one transaction. An added replica is
    /// Outdated (a full resync brings it in); a removed one loses its
    /// state and its place in the snapshot records. Err(Fenced) if the
    /// attach moved; retried while only the record (or a snapshot record
    /// it rewrites) changed meanwhile.
    pub fn change_replicas(
        &self,
        name: &str,
        volume_id: &str,
        generation: Generation,
        change: ReplicaChange<'_>,
    ) -> Result<crate::catalog::VolumeRecord, ClusterError> {
        let key = volume_key(name);
        let what = || format!("volume {name}'s record, read to change its replicas,");
        self.txn_holding(volume_id, generation, what, || {
            let k = key.clone();
            let Some(kv) = self.run(|s| async move { s.get(&k).await })? else {
                return Err(ClusterError::Etcd(format!(
                    "volume {name} is no longer in the catalog"
                )));
            };
            let mut record: crate::catalog::VolumeRecord = parse(&kv)?;
            if record.id != volume_id {
                return Err(ClusterError::Etcd(format!(
                    "volume {name} was removed and created again meanwhile; retry"
                )));
            }
            let state_key = |n: &str| format!("{}{n}", replicas_prefix(volume_id));
            // An added replica is met anew; a removed one's image is deleted.
            let incarnation_key = |n: &str| format!("{}{n}", incarnations_prefix(volume_id));
            let mut ops = Vec::new();
            let mut when = vec![Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )];
            match change {
                ReplicaChange::Add(n) | ReplicaChange::Replace { node: n, .. } => {
                    if let ReplicaChange::Replace { replaces, .. } = change {
                        record.replacing.insert(replaces.to_string(), n.to_string());
                    }
                    if !record.replicas.iter().any(|r| r == n) {
                        record.replicas.push(n.to_string());
                    }
                    let state = ReplicaRecord {
                        state: ReplicaState::Outdated,
                        generation,
                    };
                    ops.push(TxnOp::put(state_key(n), to_json(&state), None));
                    ops.push(TxnOp::delete(incarnation_key(n), None));
                }
                ReplicaChange::Remove(n) => {
                    record.replicas.retain(|r| r != n);
                    // A replacement of it, or by it, is over.
                    record.replacing.remove(n);
                    record.replacing.retain(|_, new| new != n);
                    record.spec.nodes.retain(|r| r != n);
                    ops.push(TxnOp::delete(state_key(n), None));
                    ops.push(TxnOp::delete(incarnation_key(n), None));
                    let (snaps, held) = self.snapshots_without(volume_id, n)?;
                    ops.extend(snaps);
                    when.extend(held);
                }
            }
            record.spec.repl = u8::try_from(record.replicas.len()).unwrap_or(u8::MAX);
            ops.push(TxnOp::put(key.as_str(), to_json(&record), None));
            Ok((ops, when, record))
        })
    }

    /// A [`StateStore`] bound to one volume and generation, for the data path.
    pub fn state_store(
        self: &Arc<Self>,
        volume_id: &str,
        volume: &str,
        generation: Generation,
    ) -> Arc<dyn StateStore> {
        Arc::new(EtcdStateStore {
            cluster: self.clone(),
            volume_id: volume_id.to_string(),
            volume: volume.to_string(),
            generation,
        })
    }
}

/// Replica state changes of one attach generation.
struct EtcdStateStore {
    cluster: Arc<Cluster>,
    volume_id: String,
    volume: String,
    generation: Generation,
}

impl EtcdStateStore {
    fn answer(&self, result: Result<(), ClusterError>) -> Result<(), StateStoreError> {
        match result {
            Ok(()) => Ok(()),
            Err(ClusterError::Fenced { generation, .. }) => Err(StateStoreError::Fenced {
                volume: self.volume.clone(),
                generation,
            }),
            Err(e) => Err(StateStoreError::Unavailable(e.to_string())),
        }
    }
}

impl StateStore for EtcdStateStore {
    fn set_state(&self, node: &str, state: ReplicaState) -> Result<(), StateStoreError> {
        self.answer(
            self.cluster
                .set_replica_state(&self.volume_id, self.generation, node, state),
        )
    }

    fn set_incarnation(
        &self,
        node: &str,
        incarnation: Incarnation,
        replaced: bool,
    ) -> Result<(), StateStoreError> {
        self.answer(self.cluster.set_replica_incarnation(
            &self.volume_id,
            self.generation,
            node,
            incarnation,
            replaced,
        ))
    }

    fn reached(&self) -> Result<(), StateStoreError> {
        self.answer(self.cluster.set_reached(&self.volume_id, self.generation))
    }
}

/// Replica states under `replicas/<volume id>/<node>`, by volume id then
/// node; an unreadable record is left out (it must not stop the others).
fn states_by_volume(
    kvs: &[KeyValue],
) -> std::collections::HashMap<String, BTreeMap<String, ReplicaState>> {
    let mut states: std::collections::HashMap<String, BTreeMap<String, ReplicaState>> =
        Default::default();
    let replicas = format!("{PREFIX}replicas/");
    for kv in kvs {
        let Some((id, node)) = key_tail(kv, &replicas).and_then(|t| t.split_once('/')) else {
            continue;
        };
        let Some(r) = skip_bad(parse::<ReplicaRecord>(kv)) else {
            continue;
        };
        states
            .entry(id.to_string())
            .or_default()
            .insert(node.to_string(), r.state);
    }
    states
}
