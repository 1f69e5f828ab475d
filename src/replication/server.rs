//! The replica server: serves this node's replicas to the attached node.
//! One thread per connection reads the requests: it runs small writes
//! itself and answers a burst of them with one send; everything else goes
//! to a few workers, so requests of one link run in parallel and are
//! answered out of order. A write is answered once the image has it (in the page cache,
//! which survives kill -9 of this process); a flush once the image flushed.

use super::local::LocalReplicas;
use super::local::Session;
use super::wire::{self, ErrorCode, Frame, Hello, Request, WireError, MAX_IO, PROTOCOL_VERSION};
use super::{Generation, Incarnation, LocalReplica, ReplicationError};
use crate::engine::EngineError;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that stops reading answers is gone (its node died or the
/// network is cut): the link is dropped rather than block a worker.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests of one link served at once.
const WORKERS_PER_LINK: usize = 4;

/// Runs a request forwarded by another node (a Hello's `forward`, JSON)
/// in this node's daemon: what to answer, or why not.
pub type Forwarder = Arc<dyn Fn(&str) -> Result<Answer, (ErrorCode, String)> + Send + Sync>;

/// What a forwarded request gets.
pub enum Answer {
    /// One reply (JSON), then the connection closes.
    Reply(String),
    /// A session that takes the connection over after `HelloOk` (a shared
    /// volume's client: `export::share`), on this connection's thread.
    Session(Box<dyn FnOnce(TcpStream) + Send>),
}

struct Inner {
    node: String,
    replicas: Arc<LocalReplicas>,
    forwarder: Mutex<Option<Forwarder>>,
    stop: AtomicBool,
    next_conn: AtomicU64,
    /// Live connections, to cut them at shutdown.
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// When each kind of refusal was last logged, by peer address: a
    /// misconfigured or fenced node retries every second.
    refusals: Mutex<HashMap<(Option<IpAddr>, ErrorCode), std::time::Instant>>,
}

pub struct ReplicaServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl ReplicaServer {
    /// Listen on `listen` (port 0 picks one) as node `node`.
    pub fn start(
        listen: SocketAddr,
        node: String,
        replicas: Arc<LocalReplicas>,
    ) -> Result<ReplicaServer, ReplicationError> {
        let io_err = |op| {
            move |source| ReplicationError::Io {
                op,
                path: listen.to_string().into(),
                source,
            }
        };
        let listener = TcpListener::bind(listen).map_err(io_err("listen on"))?;
        let addr = listener.local_addr().map_err(io_err("listen on"))?;
        let inner = Arc::new(Inner {
            node,
            replicas,
            forwarder: Mutex::new(None),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            refusals: Mutex::new(HashMap::new()),
        });
        let accept = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("repl-accept".into())
                .spawn(move || accept_loop(&inner, listener))
                .map_err(io_err("spawn the acceptor for"))?
        };
        tracing::info!(%addr, node = %inner.node, "replica server listening");
        Ok(ReplicaServer {
            addr,
            inner,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Who runs forwarded requests (the daemon, once it is up; until then
    /// they are refused as Busy).
    pub fn set_forwarder(&self, f: Forwarder) {
        *self.inner.forwarder.lock() = Some(f);
    }

    /// Stop accepting, cut every link and wait for their threads: when this
    /// returns, the server holds no replica any more.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.inner.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(5));
        let _ = accept.join();
        for s in self.inner.conns.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.inner.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        tracing::info!(addr = %self.addr, node = %self.inner.node, "replica server stopped");
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    for conn in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        inner.conns.lock().insert(id, clone);
        let peer = stream.peer_addr().ok();
        let spawned = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("repl-conn".into())
                .spawn(move || {
                    serve_conn(&inner, stream, peer);
                    inner.conns.lock().remove(&id);
                })
        };
        let mut threads = inner.threads.lock();
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a replica link thread");
                inner.conns.lock().remove(&id);
            }
        }
    }
}

fn send(stream: &TcpStream, frame: &Frame) -> Result<(), WireError> {
    let mut s = stream;
    wire::write_frame(&mut s, frame)
}

/// Challenge the client of `hello` to prove the cluster secret, proving
/// it first (`auth`). Err: why it is refused.
fn authenticate(
    key: &super::auth::ClusterKey,
    stream: &TcpStream,
    hello: &Hello,
    node: &str,
) -> Result<(), String> {
    let nonce = super::auth::nonce();
    let challenge = Frame::Challenge {
        nonce,
        proof: key.server_proof(&hello.nonce, &nonce, node),
    };
    send(stream, &challenge).map_err(|e| format!("sending the challenge: {e}"))?;
    let hello_bytes = Frame::Hello(hello.clone()).encode();
    match wire::read_frame(&mut &*stream) {
        Ok(Some(Frame::Proof { proof }))
            if key.verify_client(&nonce, &hello.nonce, &hello_bytes, &proof) =>
        {
            Ok(())
        }
        Ok(Some(Frame::Proof { .. })) => Err(format!(
            "node {} did not prove this cluster's secret: start every node with the same --cluster-secret-file",
            hello.from
        )),
        Ok(Some(Frame::Error { message, .. })) => Err(format!(
            "node {} refused this node's challenge: {message}",
            hello.from
        )),
        Ok(None) => Err(format!(
            "node {} hung up at the challenge: it holds no cluster secret, or another one",
            hello.from
        )),
        Ok(Some(other)) => Err(format!("expected a Proof, got {other:?}")),
        Err(e) => Err(format!("reading the proof: {e}")),
    }
}

/// How often one kind of refusal of one peer is logged as a warning (the
/// others at debug level).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

fn refuse_hello(inner: &Inner, stream: &TcpStream, code: ErrorCode, message: String) {
    let peer = stream.peer_addr().ok();
    let now = std::time::Instant::now();
    let warn = {
        let mut logged = inner.refusals.lock();
        logged.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_EVERY);
        logged.insert((peer.map(|p| p.ip()), code), now).is_none()
    };
    if warn {
        tracing::warn!(?peer, %code, message, "replica link refused (said again at most once a minute)");
    } else {
        tracing::debug!(?peer, %code, message, "replica link refused");
    }
    let _ = send(
        stream,
        &Frame::Error {
            id: 0,
            code,
            message,
        },
    );
}

fn code_of(e: &ReplicationError) -> ErrorCode {
    match e {
        ReplicationError::Fenced { .. } => ErrorCode::Fenced,
        ReplicationError::InvalidVolumeId(_) | ReplicationError::ParamsMismatch { .. } => {
            ErrorCode::Invalid
        }
        ReplicationError::Engine(
            EngineError::OutOfRange { .. }
            | EngineError::InvalidParams(_)
            | EngineError::Misaligned { .. }
            | EngineError::SnapshotExists { .. },
        ) => ErrorCode::Invalid,
        ReplicationError::Engine(EngineError::NoSuchSnapshot { .. })
        | ReplicationError::NotFound(_) => ErrorCode::NotFound,
        ReplicationError::Busy(_) | ReplicationError::Superseded { .. } => ErrorCode::Busy,
        _ => ErrorCode::Io,
    }
}

/// `incarnation`, `generation`: the replica's, the latter before the
/// Hello (0 when none is opened: a forwarded request or a restore).
fn hello_ok(inner: &Inner, incarnation: Incarnation, generation: Generation) -> Frame {
    Frame::HelloOk {
        version: PROTOCOL_VERSION,
        node: inner.node.clone(),
        incarnation,
        generation,
    }
}

fn serve_conn(inner: &Inner, stream: TcpStream, peer: Option<SocketAddr>) {
    if inner.stop.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = wire::tune_socket(&stream) {
        tracing::warn!(?peer, error = %e, "cannot set up a replica link's socket");
        return;
    }
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let hello: Hello = match wire::read_frame(&mut &stream) {
        Ok(Some(Frame::Hello(h))) => h,
        Ok(None) => return,
        Ok(Some(other)) => {
            return refuse_hello(
                inner,
                &stream,
                ErrorCode::Protocol,
                format!("the first frame must be a Hello, got {other:?}"),
            )
        }
        Err(e @ WireError::Version { .. }) => {
            return refuse_hello(inner, &stream, ErrorCode::Version, e.to_string())
        }
        Err(e) => return refuse_hello(inner, &stream, ErrorCode::Protocol, e.to_string()),
    };
    if let Some(key) = super::auth::key() {
        if let Err(why) = authenticate(key, &stream, &hello, &inner.node) {
            return refuse_hello(inner, &stream, ErrorCode::Unauthorized, why);
        }
    }
    if let Some(request) = &hello.forward {
        let forwarder = inner.forwarder.lock().clone();
        let Some(run) = forwarder else {
            return refuse_hello(
                inner,
                &stream,
                ErrorCode::Busy,
                format!("node {} is starting; retry", inner.node),
            );
        };
        // Reads the request, no replica: the long wait is the daemon's.
        let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
        tracing::info!(?peer, from = %hello.from, "request forwarded by another node");
        return match run(request) {
            Ok(Answer::Session(session)) => {
                if send(&stream, &hello_ok(inner, 0, 0)).is_ok() {
                    let _ = stream.set_read_timeout(None);
                    session(stream);
                }
            }
            Ok(Answer::Reply(reply)) => {
                let _ = send(&stream, &hello_ok(inner, 0, 0)).and_then(|()| {
                    send(
                        &stream,
                        &Frame::Data {
                            id: 0,
                            data: reply.into_bytes(),
                        },
                    )
                });
            }
            Err((code, message)) => refuse_hello(inner, &stream, code, message),
        };
    }
    if let Some(snapshot) = &hello.restore {
        return match inner
            .replicas
            .restore(&hello.volume_id, hello.generation, snapshot)
        {
            Ok(()) => {
                let _ = send(&stream, &hello_ok(inner, 0, 0));
            }
            Err(e) => refuse_hello(inner, &stream, code_of(&e), e.to_string()),
        };
    }
    let (replica, prior, session) = match inner
        .replicas
        .open_as(
            &hello.volume_id,
            hello.params(),
            hello.base.as_ref(),
            hello.copied_whole,
        )
        .and_then(|r| {
            let prior = r.generation();
            r.advance(hello.generation).map(|s| (r, prior, s))
        }) {
        Ok(r) => r,
        Err(e) => return refuse_hello(inner, &stream, code_of(&e), e.to_string()),
    };
    if send(&stream, &hello_ok(inner, replica.incarnation(), prior)).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    tracing::info!(
        ?peer,
        from = %hello.from,
        volume_id = %hello.volume_id,
        generation = hello.generation,
        "replica link up"
    );
    serve_requests(&replica, session, &stream);
    tracing::info!(?peer, from = %hello.from, volume_id = %hello.volume_id, "replica link down");
}

/// Writes up to this size that only copy into the page cache
/// ([`LocalReplica::write_is_quick`]) are run by the link's reader
/// itself, and their answers go out together once it has read everything
/// that came: such a write costs less than waking a worker, and one send
/// answers a burst. Larger writes, writes that sync (a copy-on-write, a
/// new extent in the activity log), reads (which may wait on a disk),
/// flushes and the rest go to the link's workers, so one slow request
/// never holds up the link.
const INLINE_WRITE: usize = 64 << 10;
/// Answers held back at most before they are sent anyway.
const MAX_HELD: usize = 32;
/// Payload buffers kept for reuse per link, and the largest kept.
const POOL: usize = WORKERS_PER_LINK + 2;
const POOL_MAX_BYTES: usize = 8 << 20;

/// Payload buffers handed between a link's reader and its workers, so a
/// 1 MiB write costs no mmap and no page faults (glibc mmaps blocks that
/// big, see sys/malloc.rs).
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().pop().unwrap_or_default()
    }

    fn give(&self, buf: Vec<u8>) {
        let mut p = self.0.lock();
        if p.len() < POOL && (1..=POOL_MAX_BYTES).contains(&buf.capacity()) {
            p.push(buf);
        }
    }
}

fn serve_requests(replica: &LocalReplica, session: Session, stream: &TcpStream) {
    let out = Mutex::new(stream);
    let pool = Pool(Mutex::new(Vec::new()));
    let (work_tx, work_rx) = crossbeam_channel::bounded::<(u64, Request)>(WORKERS_PER_LINK);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS_PER_LINK {
            let (out, pool, work_rx) = (&out, &pool, work_rx.clone());
            scope.spawn(move || {
                for (id, req) in work_rx {
                    let mut spare = pool.take();
                    let reply = execute(replica, session, id, &req, &mut spare);
                    let sent = match reply {
                        Reply::Frame(f) => out.lock().write_all(&f.encode()),
                        // A read's data leaves from its buffer, behind its header.
                        Reply::Data(data) => {
                            let header = wire::data_header(id, data.len());
                            let res = wire::write_parts(&mut *out.lock(), &[&header, &data]);
                            pool.give(data);
                            res
                        }
                    };
                    pool.give(spare);
                    if let Request::Write { data, .. } = req {
                        pool.give(data);
                    }
                    if sent.is_err() {
                        let _ = out.lock().shutdown(Shutdown::Both);
                    }
                }
            });
        }
        drop(work_rx);
        read_requests(replica, session, stream, &out, &pool, &work_tx);
        // The workers finish what they were given, then end.
        drop(work_tx);
    });
    let _ = stream.shutdown(Shutdown::Both);
}

/// The link's reader: runs small writes itself (see [`INLINE_WRITE`]),
/// hands the rest to the workers, until the link ends.
fn read_requests(
    replica: &LocalReplica,
    session: Session,
    stream: &TcpStream,
    out: &Mutex<&TcpStream>,
    pool: &Pool,
    work: &crossbeam_channel::Sender<(u64, Request)>,
) {
    let mut input = BufReader::with_capacity(256 << 10, stream);
    let mut held: Vec<u8> = Vec::new();
    let mut count = 0;
    let mut spare = Vec::new();
    let send_held = |held: &mut Vec<u8>, count: &mut usize| -> bool {
        let ok = held.is_empty() || out.lock().write_all(held).is_ok();
        held.clear();
        *count = 0;
        ok
    };
    loop {
        // About to read from the socket, perhaps to wait: answer first.
        if input.buffer().is_empty() && !send_held(&mut held, &mut count) {
            break;
        }
        if spare.capacity() == 0 {
            spare = pool.take();
        }
        let (id, req) = match wire::read_frame_reusing(&mut input, &mut spare) {
            Ok(Some(Frame::Request { id, req })) => (id, req),
            other => {
                match other {
                    Ok(None) => {}
                    Ok(Some(frame)) => tracing::warn!(?frame, "unexpected frame on a replica link"),
                    Err(e) => tracing::debug!(error = %e, "replica link read failed"),
                }
                break;
            }
        };
        match req {
            Request::Write { offset, ref data }
                if data.len() <= INLINE_WRITE
                    && replica.write_is_quick(offset, data.len() as u64) =>
            {
                match execute(replica, session, id, &req, &mut Vec::new()) {
                    Reply::Frame(f) => held.extend_from_slice(&f.encode()),
                    Reply::Data(_) => unreachable!("a write is answered by a frame"),
                }
                count += 1;
                if let Request::Write { data, .. } = req {
                    spare = data;
                }
                if count >= MAX_HELD && !send_held(&mut held, &mut count) {
                    break;
                }
            }
            req => {
                // Answer what ran before waiting for a worker, which may
                // be busy with a flush.
                if !send_held(&mut held, &mut count) || work.send((id, req)).is_err() {
                    break;
                }
            }
        }
    }
    // What was run is answered, if the link still takes it.
    send_held(&mut held, &mut count);
}

enum Reply {
    Frame(Frame),
    /// A read's data (the reply is a Data frame).
    Data(Vec<u8>),
}

fn execute(
    replica: &LocalReplica,
    session: Session,
    id: u64,
    req: &Request,
    spare: &mut Vec<u8>,
) -> Reply {
    let result = match *req {
        Request::Read { offset, len } | Request::Digest { offset, len } => {
            let digest = matches!(req, Request::Digest { .. });
            if len as usize > MAX_IO {
                let what = if digest { "digest" } else { "read" };
                return Reply::Frame(Frame::Error {
                    id,
                    code: ErrorCode::Invalid,
                    message: format!("{what} of {len} bytes exceeds the limit of {MAX_IO}"),
                });
            }
            let mut buf = std::mem::take(spare);
            buf.resize(len as usize, 0);
            if let Err(e) = replica.read_at(session, &mut buf, offset) {
                *spare = buf;
                return Reply::Frame(error_frame(id, &e));
            }
            if !digest {
                return Reply::Data(buf);
            }
            let sum = Sha256::digest(&buf).to_vec();
            *spare = buf;
            return Reply::Data(sum);
        }
        Request::Write { offset, ref data } => replica.write_at(session, data, offset),
        Request::Discard { offset, len } => replica.discard(session, offset, len),
        Request::Flush => replica.flush(session),
        Request::Snapshot { ref name } => replica.snapshot(session, name),
        Request::DeleteSnapshot { ref name } => replica.delete_snapshot(session, name),
        Request::Activity => {
            return match replica.activity_stamped(session) {
                Ok((stamp, words)) => Reply::Data(super::activity::encode_reply(stamp, &words)),
                Err(e) => Reply::Frame(error_frame(id, &e)),
            }
        }
        Request::Deactivate { first, count, seq } => replica.deactivate(session, first, count, seq),
        Request::ActivateAll => replica.activate_all(session),
    };
    Reply::Frame(match result {
        Ok(()) => Frame::Ok { id },
        Err(e) => error_frame(id, &e),
    })
}

fn error_frame(id: u64, e: &ReplicationError) -> Frame {
    Frame::Error {
        id,
        code: code_of(e),
        message: e.to_string(),
    }
}
