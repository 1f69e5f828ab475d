//! The records of a replicated volume's snapshots: taken on every replica,
//! then recorded with the nodes that hold them.

use super::*;

/// Snapshot records rewritten: the transaction's operations, the compares
/// that hold it to the records read, and the snapshots' names.
struct Rewrite {
    ops: Vec<TxnOp>,
    when: Vec<Compare>,
    names: Vec<String>,
}

impl Cluster {
    /// The volume's snapshot records that list `node`, rewritten without
    /// it, and the compares that hold the transaction to the records read:
    /// one changed or deleted meanwhile fails it, to be read again.
    pub(super) fn snapshots_without(
        &self,
        volume_id: &str,
        node: &str,
    ) -> Result<(Vec<TxnOp>, Vec<Compare>), ClusterError> {
        let r = self.snapshots_lacking(volume_id, node, |_| true)?;
        Ok((r.ops, r.when))
    }

    /// [`Cluster::snapshots_without`], for the snapshots named such that
    /// `lacks(name)`.
    fn snapshots_lacking(
        &self,
        volume_id: &str,
        node: &str,
        lacks: impl Fn(&str) -> bool,
    ) -> Result<Rewrite, ClusterError> {
        let prefix = snapshots_prefix(volume_id);
        let p = prefix.clone();
        let kvs = self.run(|s| async move { s.get_prefix(&p).await })?;
        let (mut ops, mut when, mut names) = (Vec::new(), Vec::new(), Vec::new());
        for kv in kvs {
            let Some(name) = key_tail(&kv, &prefix) else {
                continue;
            };
            let mut snap: SnapshotRecord = parse(&kv)?;
            if lacks(name) && snap.nodes.iter().any(|r| r == node) {
                names.push(name.to_string());
                snap.nodes.retain(|r| r != node);
                let key = format!("{prefix}{name}");
                when.push(Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                ops.push(TxnOp::put(key, to_json(&snap), None));
            }
        }
        Ok(Rewrite { ops, when, names })
    }

    /// While `generation` holds the attach: stop listing `node` on the
    /// volume's snapshots other than those in `held` (what its replica
    /// holds, after it was accepted as the data: its files may be older
    /// than the records). Answers the snapshots it was taken off.
    pub fn unlist_snapshots_lacking(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        held: &[String],
    ) -> Result<Vec<String>, ClusterError> {
        let lacks = |name: &str| !held.iter().any(|h| h == name);
        let what = || {
            format!("the snapshot records of volume {volume_id}, read to take node {node} off those its replica lacks,")
        };
        self.txn_holding(volume_id, generation, what, || {
            let r = self.snapshots_lacking(volume_id, node, lacks)?;
            Ok((r.ops, r.when, r.names))
        })
    }

    /// The volume's snapshots, oldest first.
    pub fn snapshots(&self, volume_id: &str) -> Result<Vec<SnapshotRecord>, ClusterError> {
        let prefix = snapshots_prefix(volume_id);
        let p = prefix.clone();
        let kvs = self.run(|s| async move { s.get_prefix(&p).await })?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(name) = key_tail(&kv, &prefix) {
                let mut r: SnapshotRecord = parse(&kv)?;
                r.name = name.to_string();
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        Ok(out)
    }

    /// Forget a snapshot every replica deleted, while `generation` holds
    /// the attach.
    pub fn forget_snapshot(
        &self,
        volume_id: &str,
        generation: Generation,
        name: &str,
    ) -> Result<(), ClusterError> {
        let key = format!("{}{name}", snapshots_prefix(volume_id));
        self.put_holding(volume_id, generation, TxnOp::delete(key, None))
    }

    /// Record a snapshot every replica took, while `generation` holds the
    /// attach and each replica in `taken_from` (node, the incarnation
    /// recorded when it was taken; `None`: none was) is still that image.
    /// A replica met replaced meanwhile was dropped from the snapshot
    /// records by that transaction, which ran before this one: this one
    /// fails then (`ReplicaChanged`), rather than list it again.
    pub fn record_snapshot(
        &self,
        volume_id: &str,
        generation: Generation,
        record: &SnapshotRecord,
        taken_from: &[(String, Option<Incarnation>)],
    ) -> Result<(), ClusterError> {
        if generation == 0 {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        let key = format!("{}{}", snapshots_prefix(volume_id), record.name);
        let mut when = vec![Compare::mod_revision(
            attach_key(volume_id),
            CompareOp::Equal,
            generation as i64,
        )];
        for (node, incarnation) in taken_from {
            let k = format!("{}{node}", incarnations_prefix(volume_id));
            when.push(match incarnation {
                Some(i) => Compare::value(k, CompareOp::Equal, format!("{i:016x}")),
                None => Compare::create_revision(k, CompareOp::Equal, 0),
            });
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key, to_json(record), None)]);
        if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
            return Ok(());
        }
        if self.attach_holder(volume_id)?.map(|h| h.generation) != Some(generation) {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        let now = self.replica_incarnations(volume_id)?;
        let changed = taken_from
            .iter()
            .find(|(node, i)| now.get(node) != i.as_ref())
            .map_or_else(|| "?".to_string(), |(node, _)| node.clone());
        Err(ClusterError::ReplicaChanged {
            volume: volume_id.to_string(),
            snapshot: record.name.clone(),
            node: changed,
        })
    }
}
