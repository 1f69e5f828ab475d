//! The scheduler actor: owns the [`Scheduler`] and its one timer, takes and
//! deletes scheduled snapshots through the registry (so each goes through
//! the volume's own actor), and hears of policies and attaches as events.
//! Its clock is injected: tests move a [`super::FakeClock`] and poke it.

use super::{Action, Clock, Scheduler, SnapPolicy};
use crate::registry::snapshots::{DeleteSnapshot, ListSnapshots, TakeSnapshot};
use crate::registry::Reply;
use crate::volume::snapshots::SnapshotEntry;
use actix::prelude::*;
use chrono::TimeZone;
use std::sync::Arc;
use std::time::Duration;

/// What the rest of the daemon tells the scheduler.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ScheduleEvent {
    /// A volume's policy (on create, at start), or `None` when it is gone.
    Policy {
        volume: String,
        policy: Option<SnapPolicy>,
    },
    /// A volume became attached (mounted or `dunnage attach`) or detached.
    Attached { volume: String, attached: bool },
    /// Look again now (the clock moved; tests).
    Poke,
}

/// How the actor reaches the snapshots (the registry in the daemon).
#[derive(Clone)]
pub struct SnapshotOps {
    pub take: Recipient<TakeSnapshot>,
    pub delete: Recipient<DeleteSnapshot>,
    pub list: Recipient<ListSnapshots>,
}

/// A scheduled take or delete finished.
#[derive(Message)]
#[rtype(result = "()")]
struct Done {
    volume: String,
    name: String,
    take: bool,
    ok: bool,
}

/// Scheduled snapshots that exist, found at start.
#[derive(Message)]
#[rtype(result = "()")]
struct Existing {
    volume: String,
    names: Vec<String>,
}

pub struct SnapScheduler<Tz: TimeZone> {
    sched: Scheduler<Tz>,
    clock: Arc<dyn Clock>,
    ops: SnapshotOps,
    timer: Option<SpawnHandle>,
}

impl<Tz: TimeZone + Unpin + 'static> SnapScheduler<Tz> {
    pub fn new(tz: Tz, clock: Arc<dyn Clock>, ops: SnapshotOps) -> Self {
        SnapScheduler {
            sched: Scheduler::new(tz),
            clock,
            ops,
            timer: None,
        }
    }

    /// Do what is due, then sleep until the next slot.
    fn run(&mut self, ctx: &mut Context<Self>) {
        let now = self.clock.now();
        for action in self.sched.due(now) {
            match action {
                Action::Take { volume, name, .. } => {
                    let req = self.ops.take.send(TakeSnapshot {
                        volume: volume.clone(),
                        name: Some(name.clone()),
                    });
                    ctx.spawn(req.into_actor(self).map(move |res, _, ctx| {
                        let ok = report("take", &volume, &name, res.map(|r| r.map(drop)));
                        ctx.notify(Done {
                            volume,
                            name,
                            take: true,
                            ok,
                        });
                    }));
                }
                Action::Delete { volume, name } => {
                    let req = self.ops.delete.send(DeleteSnapshot {
                        volume: volume.clone(),
                        name: name.clone(),
                    });
                    ctx.spawn(req.into_actor(self).map(move |res, _, ctx| {
                        let ok = report("delete", &volume, &name, res);
                        ctx.notify(Done {
                            volume,
                            name,
                            take: false,
                            ok,
                        });
                    }));
                }
            }
        }
        if let Some(t) = self.timer.take() {
            ctx.cancel_future(t);
        }
        if let Some(at) = self.sched.next_wake(now) {
            // Never sleep past an hour: the wall clock may jump.
            let wait = (at - now)
                .to_std()
                .unwrap_or_default()
                .min(Duration::from_secs(3600));
            self.timer = Some(ctx.run_later(wait, |act, ctx| act.run(ctx)));
        }
    }
}

fn report(what: &str, volume: &str, name: &str, res: Result<Reply<()>, MailboxError>) -> bool {
    match res {
        Ok(Ok(())) => {
            tracing::info!(volume, snapshot = name, "scheduled snapshot {what} done");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(volume, snapshot = name, error = %e, "scheduled snapshot {what} failed");
            false
        }
        Err(e) => {
            tracing::warn!(volume, snapshot = name, error = %e, "scheduled snapshot {what}: registry gone");
            false
        }
    }
}

impl<Tz: TimeZone + Unpin + 'static> Actor for SnapScheduler<Tz> {
    type Context = Context<Self>;
}

impl<Tz: TimeZone + Unpin + 'static> Handler<ScheduleEvent> for SnapScheduler<Tz> {
    type Result = ();
    fn handle(&mut self, ev: ScheduleEvent, ctx: &mut Context<Self>) {
        let now = self.clock.now();
        match ev {
            ScheduleEvent::Policy { volume, policy } => {
                if policy.is_none() {
                    self.sched.forget(&volume);
                } else {
                    let known = self.sched.policy(&volume).is_some();
                    self.sched.set_policy(&volume, policy, now);
                    if !known {
                        // Learn its scheduled snapshots (retention counts them).
                        let req = self.ops.list.send(ListSnapshots {
                            volume: volume.clone(),
                        });
                        ctx.spawn(req.into_actor(self).map(move |res, _, ctx| {
                            let names = match res {
                                Ok(Ok(list)) => {
                                    list.into_iter().map(|s: SnapshotEntry| s.name).collect()
                                }
                                _ => Vec::new(),
                            };
                            ctx.notify(Existing { volume, names });
                        }));
                    }
                }
            }
            ScheduleEvent::Attached { volume, attached } => {
                if attached {
                    if self.sched.attached_since(&volume).is_none() {
                        self.sched.attached(&volume, now);
                    }
                } else {
                    self.sched.detached(&volume);
                }
            }
            ScheduleEvent::Poke => {}
        }
        self.run(ctx);
    }
}

impl<Tz: TimeZone + Unpin + 'static> Handler<Existing> for SnapScheduler<Tz> {
    type Result = ();
    fn handle(&mut self, msg: Existing, ctx: &mut Context<Self>) {
        for name in msg.names {
            // Names that are not scheduled ones are the user's: ignored.
            self.sched.snapshot_taken(&msg.volume, &name);
        }
        self.run(ctx);
    }
}

impl<Tz: TimeZone + Unpin + 'static> Handler<Done> for SnapScheduler<Tz> {
    type Result = ();
    fn handle(&mut self, msg: Done, ctx: &mut Context<Self>) {
        match (msg.take, msg.ok) {
            (true, true) => {
                self.sched.snapshot_taken(&msg.volume, &msg.name);
            }
            (true, false) => {}
            (false, true) => self.sched.snapshot_removed(&msg.volume, &msg.name),
            (false, false) => self.sched.delete_failed(&msg.volume, &msg.name),
        }
        self.run(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::FakeClock;
    use chrono::{FixedOffset, TimeDelta, Utc};
    use parking_lot::Mutex;
    use std::collections::BTreeSet;

    /// Stands in for the registry: keeps a set of snapshot names.
    #[derive(Default)]
    struct FakeRegistry {
        snaps: Arc<Mutex<BTreeSet<String>>>,
    }
    impl Actor for FakeRegistry {
        type Context = Context<Self>;
    }
    impl Handler<TakeSnapshot> for FakeRegistry {
        type Result = Reply<SnapshotEntry>;
        fn handle(&mut self, m: TakeSnapshot, _: &mut Context<Self>) -> Self::Result {
            let name = m.name.unwrap();
            self.snaps.lock().insert(name.clone());
            Ok(SnapshotEntry {
                volume: m.volume,
                name,
                created_at: Utc::now(),
                exclusive_bytes: 0,
                referenced_bytes: 0,
                clones: vec![],
                nodes: vec![],
            })
        }
    }
    impl Handler<DeleteSnapshot> for FakeRegistry {
        type Result = Reply<()>;
        fn handle(&mut self, m: DeleteSnapshot, _: &mut Context<Self>) -> Self::Result {
            self.snaps.lock().remove(&m.name);
            Ok(())
        }
    }
    impl Handler<ListSnapshots> for FakeRegistry {
        type Result = Reply<Vec<SnapshotEntry>>;
        fn handle(&mut self, _: ListSnapshots, _: &mut Context<Self>) -> Self::Result {
            Ok(vec![])
        }
    }

    /// Let the actors exchange their messages (no time passes on the clock).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[actix_rt::test]
    async fn periodic_snapshots_fire_and_retain_under_a_fake_clock() {
        let snaps = Arc::new(Mutex::new(BTreeSet::new()));
        let reg = FakeRegistry {
            snaps: snaps.clone(),
        }
        .start();
        let t0 = Utc::now();
        let clock = FakeClock::new(t0);
        let ops = SnapshotOps {
            take: reg.clone().recipient(),
            delete: reg.clone().recipient(),
            list: reg.recipient(),
        };
        let sched = SnapScheduler::new(
            FixedOffset::east_opt(0).unwrap(),
            Arc::new(clock.clone()),
            ops,
        )
        .start();
        let policy: SnapPolicy = "periodic=10,3".parse().unwrap();
        sched.do_send(ScheduleEvent::Policy {
            volume: "v".into(),
            policy: Some(policy),
        });
        settle().await;
        // Not attached: nothing, however long.
        clock.advance(TimeDelta::minutes(60));
        sched.do_send(ScheduleEvent::Poke);
        settle().await;
        assert!(snaps.lock().is_empty(), "a detached volume got snapshots");

        sched.do_send(ScheduleEvent::Attached {
            volume: "v".into(),
            attached: true,
        });
        settle().await;
        clock.advance(TimeDelta::minutes(9));
        sched.do_send(ScheduleEvent::Poke);
        settle().await;
        assert!(snaps.lock().is_empty(), "fired before its interval");
        for i in 1..=5 {
            clock.advance(TimeDelta::minutes(if i == 1 { 1 } else { 10 }));
            sched.do_send(ScheduleEvent::Poke);
            settle().await;
            assert_eq!(
                snaps.lock().len(),
                i.min(3),
                "after {i} intervals: {:?}",
                snaps.lock()
            );
        }
        // Retention kept the newest three.
        let names: Vec<String> = snaps.lock().iter().cloned().collect();
        assert!(
            names.iter().all(|n| n.starts_with("periodic-")),
            "{names:?}"
        );
        let newest = crate::schedule::snapshot_name(
            crate::schedule::RuleKind::Periodic,
            t0 + TimeDelta::minutes(60 + 50),
        );
        assert_eq!(names.last(), Some(&newest), "{names:?}");
        // Detached: it stops.
        sched.do_send(ScheduleEvent::Attached {
            volume: "v".into(),
            attached: false,
        });
        settle().await;
        clock.advance(TimeDelta::minutes(100));
        sched.do_send(ScheduleEvent::Poke);
        settle().await;
        assert_eq!(snaps.lock().iter().cloned().collect::<Vec<_>>(), names);
    }
}
