//! The client side of a replica link: one TCP connection to a peer's
//! [`super::ReplicaServer`], pipelined. The submitting thread writes its
//! request frame itself (no hand-off to a writer thread, no copy of the
//! payload). Replies are read by the waiters themselves, one at a time
//! (leader/followers): the one reading hands each other reply to its
//! waiter, and when its own has come it passes the reading on to a waiter
//! still waiting. A lone writer (QD1) reads its own reply: no thread
//! between the socket and it. A request may instead leave a callback
//! ([`Link::submit_write_then`]), run by whoever reads its reply; while
//! callbacks wait, a reader thread of the link's own (started by the first
//! of them) reads too, taking turns with the waiters. The link is dead
//! after any error or a timeout; waiters get [`LinkDown`] and the mirror
//! connects a new one.

use super::wire::{self, ErrorCode, Frame, Hello, Request, WireError, PROTOCOL_VERSION};
use super::{Generation, Incarnation, ReplicationError};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A reply to one request.
#[derive(Debug)]
pub enum Reply {
    Ok,
    Data(Vec<u8>),
    Error { code: ErrorCode, message: String },
}

/// The link died before the reply came.
#[derive(Debug, Clone, Copy)]
pub struct LinkDown;

/// Why a call got no good reply.
#[derive(Debug)]
pub enum CallError {
    Down,
    Timeout,
    /// The peer refused: fenced, or its engine failed.
    Refused {
        code: ErrorCode,
        message: String,
    },
    /// A reply of the wrong kind.
    Unexpected,
}

impl CallError {
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            CallError::Refused {
                code: ErrorCode::Fenced,
                ..
            }
        )
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Down => f.write_str("link down"),
            CallError::Timeout => f.write_str("timed out"),
            CallError::Refused { code, message } => write!(f, "refused ({code}): {message}"),
            CallError::Unexpected => f.write_str("unexpected reply"),
        }
    }
}

/// How late a reading waiter may notice its deadline.
const READ_SLACK: Duration = Duration::from_millis(50);

/// What a waiter is told.
enum Msg {
    Reply(Result<Reply, LinkDown>),
    /// Nobody reads the link: take over.
    Lead,
}

/// Where a waiter is told: no spinning, as a waiter shares the node's
/// cores with the threads that would answer it.
#[derive(Default)]
struct Mailbox {
    mail: Mutex<Mail>,
    posted: Condvar,
}

#[derive(Default)]
struct Mail {
    reply: Option<Result<Reply, LinkDown>>,
    lead: bool,
}

impl Mailbox {
    fn post(&self, msg: Msg) {
        let mut m = self.mail.lock();
        match msg {
            Msg::Reply(r) => m.reply = Some(r),
            Msg::Lead => m.lead = true,
        }
        drop(m);
        self.posted.notify_one();
    }

    /// The reply if it came; whether told to read (the word is taken).
    fn take(&self) -> (Option<Result<Reply, LinkDown>>, bool) {
        let mut m = self.mail.lock();
        (m.reply.take(), std::mem::take(&mut m.lead))
    }

    /// Wait for a reply or a word to read until `deadline`: `None` when it
    /// passed with neither.
    fn wait(&self, deadline: Instant) -> Option<Msg> {
        let mut m = self.mail.lock();
        loop {
            if let Some(r) = m.reply.take() {
                return Some(Msg::Reply(r));
            }
            if std::mem::take(&mut m.lead) {
                return Some(Msg::Lead);
            }
            if self.posted.wait_until(&mut m, deadline).timed_out() && m.reply.is_none() && !m.lead
            {
                return None;
            }
        }
    }
}

/// What a reply is for: a thread waiting in [`Ticket::wait`], or a
/// callback to run with it.
enum Waiter {
    Wait(Arc<Mailbox>),
    Call(Callback),
}

/// Runs once with a request's outcome, on the thread that read its reply
/// (or saw the link die): it must not block.
pub type Callback = Box<dyn FnOnce(Result<Reply, CallError>) + Send>;

impl Waiter {
    fn deliver(self, r: Result<Reply, LinkDown>) {
        match self {
            Waiter::Wait(m) => m.post(Msg::Reply(r)),
            Waiter::Call(f) => f(finish(r)),
        }
    }
}

struct Pending {
    dead: bool,
    waiters: HashMap<u64, Waiter>,
    /// Callbacks among the waiters.
    calls: usize,
    /// The reader thread sleeps until a callback waits.
    reader_idle: bool,
    /// The callbacks' ids and deadlines, in the order sent (entries of
    /// callbacks already run are dropped lazily).
    deadlines: VecDeque<(u64, Instant)>,
}

impl Pending {
    /// Take the waiter of `id`, if any.
    fn take(&mut self, id: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&id);
        if matches!(w, Some(Waiter::Call(_))) {
            self.calls -= 1;
        }
        w
    }

    /// The earliest deadline of a waiting callback.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&(id, deadline)) = self.deadlines.front() {
            if matches!(self.waiters.get(&id), Some(Waiter::Call(_))) {
                return Some(deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }
}

/// Whom a reader reads for.
#[derive(Clone, Copy)]
enum Until {
    /// Its own reply (id, deadline).
    Mine(u64, Instant),
    /// The callbacks (the reader thread): until none waits.
    Calls,
}

/// The reading side of the link, held by the waiter that reads.
struct Rx {
    r: BufReader<TcpStream>,
    /// The socket's read timeout as last set (a syscall to change).
    timeout: Option<Duration>,
}

struct Shared {
    node: String,
    stream: TcpStream,
    pending: Mutex<Pending>,
    /// Held while one frame is written: frames never interleave.
    tx: Mutex<TcpStream>,
    rx: Mutex<Rx>,
    next_id: AtomicU64,
    reader_started: AtomicBool,
    /// Wakes the reader thread: a callback waits, or the link died.
    calls_posted: Condvar,
}

impl Shared {
    /// Mark the link dead, fail every waiter, cut the connection.
    fn die(&self) {
        let waiters = {
            let mut p = self.pending.lock();
            if p.dead {
                return;
            }
            p.dead = true;
            p.calls = 0;
            p.deadlines.clear();
            std::mem::take(&mut p.waiters)
        };
        self.calls_posted.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
        for (_, w) in waiters {
            w.deliver(Err(LinkDown));
        }
    }

    /// Read replies, handing each to its waiter, until `until` is met:
    /// its own reply came (returned), or no callback waits any more
    /// (`None`); or its deadline passes or the link dies.
    fn read_until(&self, rx: &mut Rx, until: Until) -> Result<Option<Reply>, CallError> {
        loop {
            let deadline = match until {
                Until::Mine(_, deadline) => deadline,
                Until::Calls => match self.pending.lock().next_deadline() {
                    Some(deadline) => deadline,
                    None => return Ok(None),
                },
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A frame may be half read: the link can't go on.
                self.die();
                return Err(CallError::Timeout);
            }
            // The socket's timeout (per read call) must not end a read
            // before the deadline; it may end one up to READ_SLACK after
            // it. Re-armed only outside that band: a syscall per request
            // otherwise.
            if !matches!(rx.timeout, Some(t) if t >= left && t <= left + 2 * READ_SLACK) {
                if rx
                    .r
                    .get_ref()
                    .set_read_timeout(Some(left + READ_SLACK))
                    .is_err()
                {
                    self.die();
                    return Err(CallError::Down);
                }
                rx.timeout = Some(left + READ_SLACK);
            }
            let (id, reply) = match wire::read_frame(&mut rx.r) {
                Ok(Some(Frame::Ok { id })) => (id, Reply::Ok),
                Ok(Some(Frame::Data { id, data })) => (id, Reply::Data(data)),
                Ok(Some(Frame::Error { id, code, message })) => {
                    (id, Reply::Error { code, message })
                }
                Ok(Some(other)) => {
                    tracing::warn!(node = %self.node, frame = ?other, "unexpected frame from replica: dropping the link");
                    self.die();
                    return Err(CallError::Down);
                }
                Ok(None) => {
                    self.die();
                    return Err(CallError::Down);
                }
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.die();
                    return Err(CallError::Timeout);
                }
                Err(e) => {
                    if !self.pending.lock().dead {
                        tracing::info!(node = %self.node, error = %e, "replica link lost");
                    }
                    self.die();
                    return Err(CallError::Down);
                }
            };
            if matches!(until, Until::Mine(mine, _) if mine == id) {
                self.pending.lock().take(id);
                return finish(Ok(reply)).map(Some);
            }
            let waiter = self.pending.lock().take(id);
            match waiter {
                Some(w) => w.deliver(Ok(reply)),
                // A waiter that gave up (its deadline passed) before its reply came.
                None if id < self.next_id.load(Ordering::Relaxed) => {}
                None => {
                    tracing::warn!(node = %self.node, id, "reply to a request never sent: dropping the link");
                    self.die();
                    return Err(CallError::Down);
                }
            }
        }
    }

    /// After a reader stepped down: if nobody reads and someone waits,
    /// tell a waiter to read. Under the pending lock, so a waiter that
    /// leaves ([`Ticket`]'s drop) either is not picked or finds the word.
    fn hand_over(&self) {
        let p = self.pending.lock();
        if p.dead || p.waiters.len() == p.calls || self.rx.is_locked() {
            return;
        }
        let waiting = p.waiters.values().find_map(|w| match w {
            Waiter::Wait(m) => Some(m),
            Waiter::Call(_) => None,
        });
        if let Some(m) = waiting {
            m.post(Msg::Lead);
        }
    }

    /// The reader thread: reads while callbacks wait (taking turns with
    /// the waiters), sleeps while none does, ends with the link.
    fn serve_calls(&self) {
        loop {
            {
                let mut p = self.pending.lock();
                while p.calls == 0 && !p.dead {
                    p.reader_idle = true;
                    self.calls_posted.wait(&mut p);
                }
                p.reader_idle = false;
                if p.dead {
                    return;
                }
            }
            let mut rx = self.rx.lock();
            let _ = self.read_until(&mut rx, Until::Calls);
            drop(rx);
            self.hand_over();
        }
    }

    /// Write one frame made of `parts`, in as few syscalls as the socket
    /// allows. Any failure kills the link.
    fn send(&self, parts: &[&[u8]]) -> Result<(), LinkDown> {
        let res = {
            let mut s = self.tx.lock();
            wire::write_parts(&mut *s, parts)
        };
        res.map_err(|_| {
            self.die();
            LinkDown
        })
    }
}

pub struct Link {
    node: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The replica's incarnation at this link's Hello.
    incarnation: Incarnation,
    /// The replica's generation before this link's Hello.
    prior: Generation,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Link {
    /// Connect to `node` at `addr` and say Hello. Fails with
    /// [`ReplicationError::Fenced`]-like refusals as
    /// [`ReplicationError::Refused`] (code [`ErrorCode::Fenced`]).
    /// `timeout` bounds connecting and every send; `handshake` the wait
    /// for the Hello's answer.
    pub fn connect(
        node: &str,
        addr: SocketAddr,
        hello: &Hello,
        timeout: Duration,
        handshake: Duration,
    ) -> Result<Link, ReplicationError> {
        let (stream, incarnation, prior) = say_hello(node, addr, hello, timeout, handshake)?;
        let io_err = |e: std::io::Error| ReplicationError::Link {
            node: node.to_string(),
            addr,
            source: WireError::Io(e),
        };
        stream.set_read_timeout(None).map_err(io_err)?;

        let shared = Arc::new(Shared {
            node: node.to_string(),
            stream: stream.try_clone().map_err(io_err)?,
            pending: Mutex::new(Pending {
                dead: false,
                waiters: HashMap::new(),
                calls: 0,
                reader_idle: false,
                deadlines: VecDeque::new(),
            }),
            tx: Mutex::new(stream.try_clone().map_err(io_err)?),
            rx: Mutex::new(Rx {
                r: BufReader::with_capacity(256 << 10, stream),
                timeout: None,
            }),
            next_id: AtomicU64::new(1),
            reader_started: AtomicBool::new(false),
            calls_posted: Condvar::new(),
        });
        Ok(Link {
            node: node.to_string(),
            addr,
            shared,
            incarnation,
            prior,
        })
    }
}

/// Restore `node`'s replica of `volume_id` to `snapshot` under
/// `generation` (which fences older sessions there). Its node refuses
/// while the replica is open.
pub fn restore_replica(
    node: &str,
    addr: SocketAddr,
    mut hello: Hello,
    snapshot: &str,
    timeout: Duration,
) -> Result<(), ReplicationError> {
    hello.restore = Some(snapshot.to_string());
    // Restoring copies the snapshot's map: as long as opening an image.
    let wait = timeout.max(Duration::from_secs(30));
    say_hello(node, addr, &hello, timeout, wait).map(drop)
}

/// Hand `request` (JSON) to the daemon of `node` (at `addr`), where the
/// volume it names is attached, and wait up to `wait` for its reply (JSON).
pub fn forward_request(
    node: &str,
    addr: SocketAddr,
    from: &str,
    request: &str,
    timeout: Duration,
    wait: Duration,
) -> Result<String, ReplicationError> {
    let stream = open_session(node, addr, from, request, timeout, wait)?;
    let link_err = |source: WireError| ReplicationError::Link {
        node: node.to_string(),
        addr,
        source,
    };
    match wire::read_frame(&mut &stream).map_err(link_err)? {
        Some(Frame::Data { id: 0, data }) => String::from_utf8(data)
            .map_err(|e| link_err(WireError::Malformed(format!("a forwarded reply: {e}")))),
        other => Err(link_err(WireError::Malformed(format!(
            "expected the forwarded request's reply, got {other:?}"
        )))),
    }
}

/// Hand `request` (JSON) to the daemon of `node` (at `addr`) as a session
/// that takes the connection over (`Answer::Session`): the connection,
/// once `node` said HelloOk (within `wait`).
pub fn open_session(
    node: &str,
    addr: SocketAddr,
    from: &str,
    request: &str,
    timeout: Duration,
    wait: Duration,
) -> Result<TcpStream, ReplicationError> {
    let params = crate::engine::ThinParams {
        size: 0,
        block_size: 0,
    };
    let hello = Hello {
        forward: Some(request.to_string()),
        ..Hello::new("-", 0, from, params)
    };
    let (stream, ..) = say_hello(node, addr, &hello, timeout, wait)?;
    Ok(stream)
}

/// Connect and say Hello; the stream once `node` said HelloOk, and the
/// replica's incarnation and generation before the Hello.
fn say_hello(
    node: &str,
    addr: SocketAddr,
    hello: &Hello,
    timeout: Duration,
    handshake: Duration,
) -> Result<(TcpStream, Incarnation, Generation), ReplicationError> {
    let link_err = |source: WireError| ReplicationError::Link {
        node: node.to_string(),
        addr,
        source,
    };
    let io_err = |e: std::io::Error| link_err(WireError::Io(e));
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io_err)?;
    wire::tune_socket(&stream).map_err(io_err)?;
    stream.set_read_timeout(Some(handshake)).map_err(io_err)?;
    // A peer that stops reading must not stall the writer forever.
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut s = &stream;
    let hello_frame = Frame::Hello(hello.clone());
    wire::write_frame(&mut s, &hello_frame).map_err(link_err)?;
    let unauthorized = |message: String| ReplicationError::Refused {
        node: node.to_string(),
        code: ErrorCode::Unauthorized,
        message,
    };
    let mut reply = wire::read_frame(&mut s).map_err(link_err)?;
    let key = super::auth::key();
    match (&reply, key) {
        (Some(Frame::Challenge { nonce, proof }), Some(key)) => {
            if !key.verify_server(&hello.nonce, nonce, node, proof) {
                return Err(unauthorized(format!(
                    "{addr} did not prove this cluster's secret as node {node}: start every node with the same --cluster-secret-file"
                )));
            }
            let proof = key.client_proof(nonce, &hello.nonce, &hello_frame.encode());
            wire::write_frame(&mut s, &Frame::Proof { proof }).map_err(link_err)?;
            reply = wire::read_frame(&mut s).map_err(link_err)?;
        }
        (Some(Frame::Challenge { .. }), None) => {
            return Err(unauthorized(format!(
                "node {node} authenticates its replica peers and this node has no cluster secret: start it with the cluster's --cluster-secret-file"
            )));
        }
        (Some(Frame::HelloOk { .. }), Some(_)) => {
            return Err(unauthorized(format!(
                "node {node} accepted this node without authenticating it (started without --cluster-secret-file): start every node with the same secret"
            )));
        }
        _ => {}
    }
    let (incarnation, prior) = match reply {
        Some(Frame::HelloOk {
            version,
            node: peer,
            incarnation,
            generation,
        }) => {
            if version != PROTOCOL_VERSION {
                return Err(link_err(WireError::Version { theirs: version }));
            }
            if peer != node {
                return Err(ReplicationError::Refused {
                    node: node.to_string(),
                    code: ErrorCode::Invalid,
                    message: format!(
                        "{addr} is node {peer:?}, not {node:?}: check the node addresses"
                    ),
                });
            }
            (incarnation, generation)
        }
        Some(Frame::Error { code, message, .. }) => {
            return Err(ReplicationError::Refused {
                node: node.to_string(),
                code,
                message,
            })
        }
        Some(other) => {
            return Err(link_err(WireError::Malformed(format!(
                "expected HelloOk, got {other:?}"
            ))))
        }
        None => {
            return Err(link_err(WireError::Io(
                std::io::ErrorKind::UnexpectedEof.into(),
            )))
        }
    };
    Ok((stream, incarnation, prior))
}

impl Link {
    /// The replica's incarnation at this link's Hello.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The replica's generation before this link's Hello: the last attach
    /// that reached it.
    pub fn prior_generation(&self) -> Generation {
        self.prior
    }

    /// Send a request; the ticket waits for its reply.
    pub fn submit(&self, req: Request) -> Result<Ticket, LinkDown> {
        self.submit_with(|id| Frame::Request { id, req }.encode())
    }

    /// Send a request encoded by `encode` for the id it is given.
    pub fn submit_with(&self, encode: impl FnOnce(u64) -> Vec<u8>) -> Result<Ticket, LinkDown> {
        let ticket = self.expect_reply()?;
        self.shared.send(&[&encode(ticket.id)])?;
        Ok(ticket)
    }

    /// Send a Write request of `data` at `offset`, straight from `data`.
    pub fn submit_write(&self, offset: u64, data: &[u8]) -> Result<Ticket, LinkDown> {
        let ticket = self.expect_reply()?;
        let header = wire::write_header(ticket.id, offset, data.len());
        self.shared.send(&[&header, data])?;
        Ok(ticket)
    }

    /// Send a Write request of `data` at `offset` (straight from `data`,
    /// as [`Link::submit_write`]); `then` runs once with its reply, or
    /// with [`CallError::Down`] when the link dies or `deadline` passes
    /// first (maybe before this returns, on this thread).
    pub fn submit_write_then(&self, offset: u64, data: &[u8], deadline: Instant, then: Callback) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = self.shared.pending.lock();
            if p.dead {
                drop(p);
                return then(Err(CallError::Down));
            }
            p.waiters.insert(id, Waiter::Call(then));
            p.calls += 1;
            p.deadlines.push_back((id, deadline));
            if std::mem::take(&mut p.reader_idle) {
                self.shared.calls_posted.notify_one();
            }
        }
        if !self.shared.reader_started.swap(true, Ordering::AcqRel) {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("link-{}", self.node))
                .spawn(move || shared.serve_calls());
            if let Err(e) = spawned {
                tracing::error!(node = %self.node, error = %e, "cannot start the replica link's reader");
                return self.shared.die();
            }
        }
        let header = wire::write_header(id, offset, data.len());
        // A failed send kills the link, which runs `then`.
        let _ = self.shared.send(&[&header, data]);
    }

    /// A new id and the ticket of its reply (registered before the
    /// request is sent, as the reply may come at once).
    fn expect_reply(&self) -> Result<Ticket, LinkDown> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        let mut p = self.shared.pending.lock();
        if p.dead {
            return Err(LinkDown);
        }
        p.waiters.insert(id, Waiter::Wait(mailbox.clone()));
        Ok(Ticket {
            id,
            mailbox,
            shared: self.shared.clone(),
        })
    }

    /// Send a request and wait for its reply until `deadline`.
    pub fn call(&self, req: Request, deadline: Instant) -> Result<Reply, CallError> {
        self.submit(req)
            .map_err(|LinkDown| CallError::Down)?
            .wait(deadline)
    }

    /// Drop the connection; every waiter gets [`LinkDown`]. Idempotent.
    pub fn kill(&self) {
        self.shared.die();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A submitted request's claim on its reply.
pub struct Ticket {
    id: u64,
    mailbox: Arc<Mailbox>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// Wait for the reply until `deadline`, reading the link when nobody
    /// else does.
    pub fn wait(self, deadline: Instant) -> Result<Reply, CallError> {
        loop {
            if let (Some(r), _) = self.mailbox.take() {
                return finish(r);
            }
            if let Some(mut rx) = self.shared.rx.try_lock() {
                // The reply may have been handed over before the lock came
                // (only the reader hands replies over, so none comes now).
                if let (Some(r), _) = self.mailbox.take() {
                    drop(rx);
                    self.shared.hand_over();
                    return finish(r);
                }
                let res = self
                    .shared
                    .read_until(&mut rx, Until::Mine(self.id, deadline));
                drop(rx);
                self.shared.hand_over();
                return res.map(|r| r.expect("read until its own reply"));
            }
            match self.mailbox.wait(deadline) {
                Some(Msg::Reply(r)) => return finish(r),
                Some(Msg::Lead) => {}
                None => return Err(CallError::Timeout),
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Leave the waiters, then pass on a word to read that came for us
        // (hand_over sends it under the pending lock, so none comes later).
        self.shared.pending.lock().take(self.id);
        if self.mailbox.take().1 {
            self.shared.hand_over();
        }
    }
}

fn finish(r: Result<Reply, LinkDown>) -> Result<Reply, CallError> {
    match r {
        Ok(Reply::Error { code, message }) => Err(CallError::Refused { code, message }),
        Ok(reply) => Ok(reply),
        Err(LinkDown) => Err(CallError::Down),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ThinParams;
    use std::net::TcpListener;

    /// A peer that says HelloOk as `node`, then reads `batch` requests at a
    /// time and answers each batch in reverse order (a Data frame of the
    /// request's id for reads, Ok otherwise); with `batch` 0 it never
    /// answers.
    fn peer(node: &'static str, batch: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(&s);
            assert!(matches!(
                wire::read_frame(&mut r),
                Ok(Some(Frame::Hello(_)))
            ));
            let ok = Frame::HelloOk {
                version: PROTOCOL_VERSION,
                node: node.into(),
                incarnation: 1,
                generation: 0,
            };
            wire::write_frame(&mut &s, &ok).unwrap();
            let mut held = Vec::new();
            while let Ok(Some(Frame::Request { id, req })) = wire::read_frame(&mut r) {
                held.push((id, req));
                if batch == 0 || held.len() < batch {
                    continue;
                }
                for (id, req) in held.drain(..).rev() {
                    let reply = match req {
                        Request::Read { .. } => Frame::Data {
                            id,
                            data: id.to_be_bytes().to_vec(),
                        },
                        _ => Frame::Ok { id },
                    };
                    if wire::write_frame(&mut &s, &reply).is_err() {
                        return;
                    }
                }
            }
        });
        addr
    }

    fn connect(addr: SocketAddr) -> Link {
        let params = ThinParams {
            size: 1 << 20,
            block_size: 4096,
        };
        let hello = Hello::new("0123456789abcdef0123456789abcdef", 1, "a", params);
        let t = Duration::from_secs(10);
        Link::connect("b", addr, &hello, t, t).unwrap()
    }

    #[test]
    fn waiters_read_for_each_other_and_each_gets_its_own_reply() {
        // Eight threads, replies in reverse order of a batch of eight:
        // whoever reads must hand the others theirs, and pass the
        // reading on when its own came. Frames of many senders, small and
        // large, never interleave (the peer parses every frame).
        let link = Arc::new(connect(peer("b", 8)));
        let rounds = 50;
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let link = link.clone();
                scope.spawn(move || {
                    for k in 0..rounds {
                        let deadline = Instant::now() + Duration::from_secs(20);
                        if k % 10 == 9 {
                            let big = vec![k as u8; 200 << 10];
                            let t = link.submit_write(0, &big).unwrap();
                            let id = t.id;
                            let res = t.wait(deadline);
                            assert!(matches!(res, Ok(Reply::Ok)), "write {id}: {res:?}");
                            continue;
                        }
                        let t = link.submit(Request::Read { offset: 0, len: 8 }).unwrap();
                        let id = t.id;
                        match t.wait(deadline) {
                            Ok(Reply::Data(d)) => assert_eq!(d, id.to_be_bytes()),
                            other => panic!("request {id}: {other:?}"),
                        }
                    }
                });
            }
        });
        assert!(!link.shared.pending.lock().dead);
        assert!(link.shared.pending.lock().waiters.is_empty());
    }

    /// `n` writes by callback on `link`; their outcomes, by id order of
    /// sending, once all came.
    fn writes_then(link: &Link, n: usize, deadline: Instant) -> Vec<Result<Reply, CallError>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for k in 0..n {
            let tx = tx.clone();
            let then: Callback = Box::new(move |res| tx.send((k, res)).unwrap());
            link.submit_write_then(0, &[k as u8; 4096], deadline, then);
        }
        let mut out: Vec<_> = (0..n)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(30))
                    .expect("a callback ran")
            })
            .collect();
        assert!(rx.try_recv().is_err(), "each callback ran once");
        out.sort_by_key(|(k, _)| *k);
        out.into_iter().map(|(_, r)| r).collect()
    }

    #[test]
    fn callbacks_get_their_replies_with_waiters_reading_or_not() {
        // Callbacks alone, replies in reverse order of batches of eight:
        // the link's reader thread reads for them.
        let link = connect(peer("b", 8));
        let far = Instant::now() + Duration::from_secs(30);
        for res in writes_then(&link, 64, far) {
            assert!(matches!(res, Ok(Reply::Ok)), "{res:?}");
        }
        assert_eq!(link.shared.pending.lock().calls, 0);
        // With threads waiting too (a peer answering each request at
        // once): whoever reads runs the callbacks it reads replies for,
        // and hands the waiters theirs.
        let link = Arc::new(connect(peer("b", 1)));
        std::thread::scope(|scope| {
            for _ in 0..3 {
                let link = link.clone();
                scope.spawn(move || {
                    for _ in 0..40 {
                        let t = link.submit(Request::Read { offset: 0, len: 8 }).unwrap();
                        let id = t.id;
                        match t.wait(Instant::now() + Duration::from_secs(30)) {
                            Ok(Reply::Data(d)) => assert_eq!(d, id.to_be_bytes()),
                            other => panic!("request {id}: {other:?}"),
                        }
                    }
                });
            }
            for _ in 0..8 {
                for res in writes_then(&link, 5, far) {
                    assert!(matches!(res, Ok(Reply::Ok)), "{res:?}");
                }
            }
        });
        let p = link.shared.pending.lock();
        assert!(!p.dead);
        assert!(p.waiters.is_empty());
        assert_eq!(p.calls, 0);
    }

    #[test]
    fn a_callback_past_its_deadline_kills_the_link() {
        let link = connect(peer("b", 0));
        let t0 = Instant::now();
        let res = writes_then(&link, 3, Instant::now() + Duration::from_millis(300));
        assert!(
            res.iter().all(|r| matches!(r, Err(CallError::Down))),
            "{res:?}"
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "timed out early"
        );
        assert!(link.shared.pending.lock().dead);
        // On a dead link, the callback runs at once.
        let res = writes_then(&link, 1, Instant::now() + Duration::from_secs(60));
        assert!(matches!(res[0], Err(CallError::Down)), "{res:?}");
    }

    #[test]
    fn a_lone_request_reads_its_own_reply() {
        let link = connect(peer("b", 1));
        for _ in 0..100 {
            let deadline = Instant::now() + Duration::from_secs(20);
            assert!(matches!(link.call(Request::Flush, deadline), Ok(Reply::Ok)));
        }
    }

    #[test]
    fn a_reader_past_its_deadline_kills_the_link_and_fails_the_others() {
        let link = connect(peer("b", 0));
        // Sent, but not waited for yet: the call below is the one reading.
        let other = link.submit(Request::Flush).unwrap();
        let t0 = Instant::now();
        let res = link.call(Request::Flush, Instant::now() + Duration::from_millis(300));
        assert!(matches!(res, Err(CallError::Timeout)), "{res:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "timed out early"
        );
        // The other request, far from its deadline, learns the link is down.
        let res = other.wait(Instant::now() + Duration::from_secs(60));
        assert!(matches!(res, Err(CallError::Down)), "{res:?}");
        assert!(matches!(link.submit(Request::Flush), Err(LinkDown)));
    }

    #[test]
    fn a_reply_queued_behind_words_to_read_is_found() {
        // Two readers that stepped down both told this waiter to read, and
        // a third handed it its reply: it must not read the link for it.
        let link = connect(peer("b", 0));
        let t = link.submit(Request::Flush).unwrap();
        {
            let p = link.shared.pending.lock();
            let Waiter::Wait(w) = &p.waiters[&t.id] else {
                panic!("a ticket's waiter is a mailbox");
            };
            w.post(Msg::Lead);
            w.post(Msg::Lead);
            w.post(Msg::Reply(Ok(Reply::Ok)));
        }
        let res = t.wait(Instant::now() + Duration::from_secs(60));
        assert!(matches!(res, Ok(Reply::Ok)), "{res:?}");
        assert!(!link.shared.pending.lock().dead);
    }

    #[test]
    fn a_peer_of_another_name_is_refused() {
        let params = ThinParams {
            size: 1 << 20,
            block_size: 4096,
        };
        let hello = Hello::new("0123456789abcdef0123456789abcdef", 1, "a", params);
        let t = Duration::from_secs(10);
        let err = Link::connect("b", peer("c", 1), &hello, t, t).unwrap_err();
        assert!(err.to_string().contains("not \"b\""), "{err}");
    }
}
