//! Membership: this node's lease and member key, kept alive by a task on
//! the cluster runtime; the list of members and their addresses.

use super::*;

impl Shared {
    fn member_record(&self) -> MemberRecord {
        MemberRecord {
            name: self.node.clone(),
            addr: self.addr,
            started_at: self.started_at,
            capacity: None,
            zone: self.zone.clone(),
        }
    }

    /// Grant a fresh lease and put this node's member keys under it.
    pub(super) async fn register(&self) -> Result<i64, ClusterError> {
        let mut leases = self.client.lease_client();
        let ttl = self.ttl.as_secs() as i64;
        let id = leases
            .grant(ttl, None)
            .await
            .map_err(|e| self.error(e))?
            .id();
        let claimed = self.claim_name(id).await;
        if claimed.is_err() {
            let _ = leases.revoke(id).await;
        }
        claimed.map(|()| id)
    }

    async fn claim_name(&self, lease: i64) -> Result<(), ClusterError> {
        let key = node_key(&self.node);
        let value = to_json(&self.member_record());
        for _ in 0..10 {
            // A live key with another address is another daemon; with this
            // address it is an earlier run of this node (whose lease has
            // not expired yet), which this one replaces.
            let guard = match self.get(&key).await? {
                Some(kv) => {
                    let other: MemberRecord = parse(&kv)?;
                    if other.addr != self.addr {
                        return Err(ClusterError::NameTaken {
                            node: self.node.clone(),
                        });
                    }
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([guard]).and_then([
                TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(known_key(&self.node), value.clone(), None),
            ]);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(ClusterError::Etcd(format!(
            "the member key of node {} kept changing while this node registered; is another daemon starting with the same name?",
            self.node
        )))
    }

    /// One keepalive round trip. `Ok(false)`: etcd says the lease is gone.
    async fn keep_once(
        &self,
        id: i64,
        slot: &mut Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    ) -> Result<bool, etcd_client::Error> {
        if let Some((sid, keeper, stream)) = slot.as_mut() {
            if *sid == id {
                keeper.keep_alive().await?;
                return match stream.message().await? {
                    Some(resp) => Ok(resp.ttl() > 0),
                    None => Err(etcd_client::Error::LeaseKeepAliveError(
                        "the keepalive stream closed".into(),
                    )),
                };
            }
        }
        // Opening the stream sends the first keepalive and waits for its answer.
        match self.client.lease_client().keep_alive(id).await {
            Ok((keeper, stream)) => {
                *slot = Some((id, keeper, stream));
                Ok(true)
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Mark the lease lost (once) and tell the callbacks, off the runtime's
    /// workers: a callback may block, or call back into the cluster.
    pub(super) fn lose(&self, why: &str) {
        {
            let mut lease = self.lease.lock();
            if lease.lost || self.stopped.load(Ordering::SeqCst) {
                return;
            }
            lease.lost = true;
        }
        warn!(node = %self.node, "etcd lease lost: {why}; this node must stop writing to its attached volumes");
        let callbacks = self.callbacks.lock().clone();
        tokio::task::spawn_blocking(move || {
            for cb in callbacks {
                cb();
            }
        });
    }

    fn check_expiry(&self) {
        let expired = self.lease.lock().last_ok.elapsed() >= self.ttl;
        if expired {
            self.lose("no keepalive acknowledged within the lease TTL");
        }
    }
}

impl Cluster {
    /// Every node that ever joined; `up` when its lease-backed key is present.
    pub fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let (known, live, cordoned) = self.run(|s| async move {
            // One txn: both ranges from the same revision.
            let resp = s
                .txn(Txn::new().and_then([
                    TxnOp::get(
                        format!("{PREFIX}known/"),
                        Some(GetOptions::new().with_prefix()),
                    ),
                    TxnOp::get(
                        format!("{PREFIX}nodes/"),
                        Some(GetOptions::new().with_prefix()),
                    ),
                    TxnOp::get(
                        format!("{PREFIX}cordoned/"),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    ),
                ]))
                .await?;
            let cordoned: BTreeSet<String> = txn_kvs(&resp, 2)
                .iter()
                .filter_map(|kv| kv.key_str().ok())
                .filter_map(|k| {
                    k.strip_prefix(&format!("{PREFIX}cordoned/"))
                        .map(str::to_string)
                })
                .collect();
            Ok((txn_kvs(&resp, 0), txn_kvs(&resp, 1), cordoned))
        })?;
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        for (kvs, up) in [(known, false), (live, true)] {
            for kv in kvs {
                let r: MemberRecord = parse(&kv)?;
                members.insert(
                    r.name.clone(),
                    Member {
                        cordoned: cordoned.contains(&r.name),
                        capacity: r.capacity,
                        zone: r.zone,
                        name: r.name,
                        addr: r.addr,
                        up,
                        started_at: r.started_at,
                    },
                );
            }
        }
        Ok(members.into_values().collect())
    }

    /// Publish this node's data directory's size and free space in its
    /// member keys (`node ls`), under its live lease only.
    pub fn report_capacity(&self, capacity: Capacity) -> Result<(), ClusterError> {
        let lease = self.live_lease()?;
        let record = MemberRecord {
            capacity: Some(capacity),
            ..self.shared.member_record()
        };
        self.run(|s| async move {
            let key = node_key(&s.node);
            let value = to_json(&record);
            let txn = Txn::new()
                .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(known_key(&s.node), value, None),
                ]);
            s.txn(txn).await.map(drop)
        })
    }

    /// Cordon `node` (placement puts no new replica there; those it holds
    /// stay) or lift it. Refused for a node that never joined.
    pub fn set_cordoned(&self, node: &str, cordoned: bool) -> Result<(), ClusterError> {
        let node = node.to_string();
        self.run(|s| async move {
            let known = known_key(&node);
            let key = cordon_key(&node);
            let op = if cordoned {
                TxnOp::put(key.as_str(), "{}", None)
            } else {
                TxnOp::delete(key.as_str(), None)
            };
            let txn = Txn::new()
                .when([Compare::create_revision(
                    known.as_str(),
                    CompareOp::Greater,
                    0,
                )])
                .and_then([op]);
            if s.txn(txn).await?.succeeded() {
                Ok(())
            } else {
                Err(ClusterError::Node(format!(
                    "node {node} is not a member of the cluster (`dunnage node ls` lists them)"
                )))
            }
        })
    }

    /// Forget `node`, gone for good: it leaves `node ls`. Refused while it
    /// is up, and while a volume has a replica on it (`volume_replicas`:
    /// each volume's name and replica nodes, from the catalog). A node
    /// forgotten that starts again joins again.
    pub fn forget_node(
        &self,
        node: &str,
        volume_replicas: &[(String, Vec<String>)],
    ) -> Result<(), ClusterError> {
        let holding: Vec<&str> = volume_replicas
            .iter()
            .filter(|(_, nodes)| nodes.iter().any(|n| n == node))
            .map(|(v, _)| v.as_str())
            .collect();
        if !holding.is_empty() {
            return Err(ClusterError::Node(format!(
                "node {node} holds replicas of {}: move them first (`dunnage node evacuate {node}`, or `dunnage replica rm VOLUME {node}` for each)",
                holding.join(", ")
            )));
        }
        let node = node.to_string();
        self.run(|s| async move {
            let known = known_key(&node);
            let live = node_key(&node);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(known.as_str(), CompareOp::Greater, 0),
                    Compare::create_revision(live.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::delete(known.as_str(), None),
                    TxnOp::delete(cordon_key(&node).as_str(), None),
                ]);
            if s.txn(txn).await?.succeeded() {
                return Ok(());
            }
            Err(ClusterError::Node(if s.get(&live).await?.is_some() {
                format!("node {node} is up: stop its dunnage serve first (a node that is only being drained stays a member: `dunnage node evacuate {node}`)")
            } else {
                format!("node {node} is not a member of the cluster (`dunnage node ls` lists them)")
            }))
        })
    }

    /// The address of `node` if it is up.
    pub fn member_addr(&self, node: &str) -> Result<Option<SocketAddr>, ClusterError> {
        let key = node_key(node);
        let kv = self.run(|s| async move { s.get(&key).await })?;
        kv.map(|kv| parse::<MemberRecord>(&kv).map(|r| r.addr))
            .transpose()
    }

    /// False once keepalives have failed for longer than the TTL: this
    /// node's attach keys are then gone (or about to be).
    pub fn lease_alive(&self) -> bool {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return false;
        }
        let lease = self.shared.lease.lock();
        !lease.lost && lease.last_ok.elapsed() < self.shared.ttl
    }

    /// `f` is called, on a cluster thread, each time the lease is lost; the
    /// node must then stop writing. It registers again by itself.
    pub fn on_lease_lost(&self, f: Box<dyn Fn() + Send + Sync>) {
        self.shared.callbacks.lock().push(Arc::from(f));
    }

    pub(super) fn live_lease(&self) -> Result<i64, ClusterError> {
        if !self.lease_alive() {
            return Err(ClusterError::LeaseLost {
                node: self.shared.node.clone(),
            });
        }
        Ok(self.shared.lease.lock().id)
    }

    /// Test hook: stop sending keepalives (and registering again), as a node
    /// cut off from etcd would. Loss is still detected and reported.
    #[doc(hidden)]
    pub fn stop_keepalive(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
    }

    /// Test hook: undo [`Cluster::stop_keepalive`].
    #[doc(hidden)]
    pub fn resume_keepalive(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

/// Keep the lease alive; when it is lost, tell the callbacks and register
/// again with a fresh lease until etcd answers.
pub(super) async fn keepalive(shared: Arc<Shared>) {
    let period = (shared.ttl / 3).max(Duration::from_millis(200));
    let mut stream = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.wake.notified() => {}
        }
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        if shared.paused.load(Ordering::SeqCst) {
            stream = None;
            shared.check_expiry();
            continue;
        }
        let (id, lost) = {
            let lease = shared.lease.lock();
            (lease.id, lease.lost)
        };
        if lost {
            stream = None;
            let sent = Instant::now();
            match tokio::time::timeout(CALL_TIMEOUT, shared.register()).await {
                Ok(Ok(new)) => {
                    *shared.lease.lock() = Lease {
                        id: new,
                        last_ok: sent,
                        lost: false,
                    };
                    info!(node = %shared.node, "registered again in etcd with a new lease");
                    failures = 0;
                    // The old lease may outlive our count of it: end it now.
                    let mut leases = shared.client.lease_client();
                    let _ = tokio::time::timeout(CALL_TIMEOUT, leases.revoke(id)).await;
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        warn!(node = %shared.node, "cannot register in etcd again (attempt {failures}): {e}");
                    }
                }
                Err(_) => failures += 1,
            }
            continue;
        }
        let sent = Instant::now();
        match tokio::time::timeout(period, shared.keep_once(id, &mut stream)).await {
            Ok(Ok(true)) => {
                let mut lease = shared.lease.lock();
                if lease.id == id && !lease.lost {
                    lease.last_ok = sent;
                }
            }
            Ok(Ok(false)) => shared.lose("etcd reports the lease expired"),
            Ok(Err(e)) => {
                debug!(node = %shared.node, "lease keepalive failed: {e}");
                stream = None;
            }
            Err(_) => stream = None,
        }
        shared.check_expiry();
    }
}
