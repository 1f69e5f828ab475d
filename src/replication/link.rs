//! The client side of a replica link: one TCP connection to a peer's
//! [`super::ReplicaServer`], pipelined. The submitting thread writes its
//! request frame itself (no hand-off to a writer thread, no copy of the
//! payload), a reader thread hands each reply to whoever waits for its id.
//! The link is dead after any error; waiters get [`LinkDown`] and the
//! mirror connects a new one.

use super::wire::{self, ErrorCode, Frame, Hello, Request, WireError, PROTOCOL_VERSION};
use super::ReplicationError;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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

type Waiter = Sender<Result<Reply, LinkDown>>;

struct Pending {
    dead: bool,
    waiters: HashMap<u64, Waiter>,
}

struct Shared {
    stream: TcpStream,
    pending: Mutex<Pending>,
    /// Held while one frame is written: frames never interleave.
    tx: Mutex<TcpStream>,
}

impl Shared {
    /// Mark the link dead, fail every waiter, stop both threads.
    fn die(&self) {
        let waiters = {
            let mut p = self.pending.lock();
            if p.dead {
                return;
            }
            p.dead = true;
            std::mem::take(&mut p.waiters)
        };
        for (_, w) in waiters {
            let _ = w.send(Err(LinkDown));
        }
        let _ = self.stream.shutdown(Shutdown::Both);
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
    next_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
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
        let link_err = |source: WireError| ReplicationError::Link {
            node: node.to_string(),
            addr,
            source,
        };
        let io_err = |e: std::io::Error| link_err(WireError::Io(e));
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        stream.set_read_timeout(Some(handshake)).map_err(io_err)?;
        // A peer that stops reading must not stall the writer forever.
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let mut s = &stream;
        wire::write_frame(&mut s, &Frame::Hello(hello.clone())).map_err(link_err)?;
        match wire::read_frame(&mut s).map_err(link_err)? {
            Some(Frame::HelloOk {
                version,
                node: peer,
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
        }
        stream.set_read_timeout(None).map_err(io_err)?;

        let shared = Arc::new(Shared {
            stream: stream.try_clone().map_err(io_err)?,
            pending: Mutex::new(Pending {
                dead: false,
                waiters: HashMap::new(),
            }),
            tx: Mutex::new(stream.try_clone().map_err(io_err)?),
        });
        let reader = {
            let shared = shared.clone();
            let node = node.to_string();
            std::thread::Builder::new()
                .name(format!("repl-rx-{node}"))
                .spawn(move || read_loop(&shared, stream, &node))
                .map_err(io_err)?
        };
        Ok(Link {
            node: node.to_string(),
            addr,
            shared,
            next_id: AtomicU64::new(1),
            threads: Mutex::new(vec![reader]),
        })
    }

    /// Send a request; the receiver gets its reply.
    pub fn submit(&self, req: Request) -> Result<Receiver<Result<Reply, LinkDown>>, LinkDown> {
        self.submit_with(|id| Frame::Request { id, req }.encode())
    }

    /// Send a request encoded by `encode` for the id it is given.
    pub fn submit_with(
        &self,
        encode: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<Receiver<Result<Reply, LinkDown>>, LinkDown> {
        let (id, rx) = self.expect_reply()?;
        self.shared.send(&[&encode(id)])?;
        Ok(rx)
    }

    /// Send a Write request of `data` at `offset`, straight from `data`.
    pub fn submit_write(
        &self,
        offset: u64,
        data: &[u8],
    ) -> Result<Receiver<Result<Reply, LinkDown>>, LinkDown> {
        let (id, rx) = self.expect_reply()?;
        let header = wire::write_header(id, offset, data.len());
        self.shared.send(&[&header, data])?;
        Ok(rx)
    }

    /// A new id and the receiver of its reply (registered before the
    /// request is sent, as the reply may come at once).
    fn expect_reply(&self) -> Result<(u64, Receiver<Result<Reply, LinkDown>>), LinkDown> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut p = self.shared.pending.lock();
        if p.dead {
            return Err(LinkDown);
        }
        p.waiters.insert(id, tx);
        Ok((id, rx))
    }

    /// Send a request and wait for its reply until `deadline`.
    pub fn call(&self, req: Request, deadline: Instant) -> Result<Reply, CallError> {
        let rx = self.submit(req).map_err(|LinkDown| CallError::Down)?;
        wait(&rx, deadline)
    }

    /// Drop the connection; every waiter gets [`LinkDown`]. Idempotent.
    pub fn kill(&self) {
        self.shared.die();
    }

    /// Kill and wait for the link's threads.
    pub fn close(&self) {
        self.kill();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

/// Wait for a submitted request's reply until `deadline`.
pub fn wait(rx: &Receiver<Result<Reply, LinkDown>>, deadline: Instant) -> Result<Reply, CallError> {
    match rx.recv_deadline(deadline) {
        Ok(Ok(Reply::Error { code, message })) => Err(CallError::Refused { code, message }),
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(LinkDown)) => Err(CallError::Down),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(CallError::Timeout),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(CallError::Down),
    }
}

fn read_loop(shared: &Shared, stream: TcpStream, node: &str) {
    let mut r = BufReader::with_capacity(256 << 10, stream);
    loop {
        let (id, reply) = match wire::read_frame(&mut r) {
            Ok(Some(Frame::Ok { id })) => (id, Reply::Ok),
            Ok(Some(Frame::Data { id, data })) => (id, Reply::Data(data)),
            Ok(Some(Frame::Error { id, code, message })) => (id, Reply::Error { code, message }),
            Ok(Some(other)) => {
                tracing::warn!(node, frame = ?other, "unexpected frame from replica: dropping the link");
                break;
            }
            Ok(None) => break,
            Err(e) => {
                if !shared.pending.lock().dead {
                    tracing::info!(node, error = %e, "replica link lost");
                }
                break;
            }
        };
        let waiter = shared.pending.lock().waiters.remove(&id);
        match waiter {
            Some(w) => {
                let _ = w.send(Ok(reply));
            }
            None => {
                tracing::warn!(node, id, "reply to an unknown request: dropping the link");
                break;
            }
        }
    }
    shared.die();
}
