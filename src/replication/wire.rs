//! The replica link's wire protocol: TCP, length-prefixed binary frames.
//!
//! Every frame is `u32 length` (big-endian, of what follows), `u8 kind`,
//! `u64 request id`, then the kind's payload (integers big-endian, strings
//! as `u16 length` + UTF-8). The first frame of a connection is a
//! [`Hello`] (id 0), answered by `HelloOk` or an `Error`. After it, the
//! client sends requests with ids of its choosing; the server answers each
//! with `Ok`, `Data` or `Error` carrying the same id, in any order (requests
//! run in parallel, so a client pipelines).
//!
//! A Hello starts with the magic and the protocol version, in a layout no
//! version may change, so a server refuses a client of another version with
//! a clear error instead of misreading it.

use super::{auth, Generation, ReplicaBase};
use crate::engine::ThinParams;
use std::io::{self, IoSlice, Read, Write};

/// First bytes of every Hello.
pub const MAGIC: [u8; 8] = *b"dunnrepl";
/// The protocol this build speaks.
/// 2: `Digest` requests (verify after an unclean failover).
/// 3: `Snapshot` and `DeleteSnapshot` requests, the `NotFound` error, and
///    a Hello that restores the replica to a snapshot instead.
/// 4: a Hello that hands a request to the node's daemon instead
///    (`forward`), answered by `HelloOk` and one `Data` frame.
/// 5: `HelloOk` says whether the replica holds anything (blocks or
///    snapshots), so a replica whose files were lost is not trusted.
/// 6: `HelloOk` carries the replica's incarnation instead; a Hello says
///    whether an absent image is to be copied whole (`copied_whole`).
/// 7: `Activity` and `Deactivate` requests (the replica's activity log).
/// 8: no `Deactivate` while a replica is out of sync (the logs then hold
///    what it misses, and an outdated replica is resynced from them);
///    `ActivateAll` before a replica is copied whole; `HelloOk` carries
///    the replica's generation before the Hello; `Deactivate` carries the
///    clear's count and `Activity` answers the last clear's stamp too.
/// 9: a Hello carries a nonce; a server with a cluster secret answers it
///    with a `Challenge`, which the client answers with a `Proof`, before
///    its `HelloOk` (`auth`); the `Unauthorized` error.
pub const PROTOCOL_VERSION: u32 = 9;
/// Largest frame accepted (a write or read of up to 64 MiB plus headers).
pub const MAX_FRAME: usize = (64 << 20) + 4096;
/// Largest read or write one request may carry.
pub const MAX_IO: usize = 64 << 20;

const KIND_HELLO: u8 = 1;
const KIND_HELLO_OK: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_READ: u8 = 4;
const KIND_WRITE: u8 = 5;
const KIND_DISCARD: u8 = 6;
const KIND_FLUSH: u8 = 7;
const KIND_OK: u8 = 8;
const KIND_DATA: u8 = 9;
const KIND_DIGEST: u8 = 10;
const KIND_SNAPSHOT: u8 = 11;
const KIND_DELETE_SNAPSHOT: u8 = 12;
const KIND_ACTIVITY: u8 = 13;
const KIND_DEACTIVATE: u8 = 14;
const KIND_ACTIVATE_ALL: u8 = 15;
const KIND_CHALLENGE: u8 = 16;
const KIND_PROOF: u8 = 17;

/// The first message of a connection: who asks, for which replica, under
/// which attach generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub volume_id: String,
    pub generation: Generation,
    /// The node the client runs on (the volume's attached node).
    pub from: String,
    /// The image's size and block size: a replica that is absent is created
    /// with them, one that exists must match them.
    pub size: u64,
    pub block_size: u32,
    /// Instead of serving IO: restore the replica (which must not be open
    /// on its node) to this snapshot, answer, and close the connection.
    pub restore: Option<String>,
    /// The volume is a clone: a replica that is absent is made a clone of
    /// the server's replica of this volume, at this snapshot.
    pub base: Option<ReplicaBase>,
    /// Instead of serving IO: a request (JSON) for the node's daemon, about
    /// a volume attached there (`volume::forward`). The answer is a
    /// `HelloOk` then a `Data` frame (id 0) with the reply's JSON, or an
    /// `Error`; then the connection closes.
    pub forward: Option<String>,
    /// The mirror copies this replica whole (it does not know what it
    /// holds, or a new image would be found replaced): one that is absent
    /// is made an empty plain image, even a clone's (on a node without its
    /// parent's replica, say). Never for a replica the mirror may take for
    /// in sync: a new clone's first replicas are clones of its base.
    pub copied_whole: bool,
    /// Fresh for each connection: what a server with a cluster secret
    /// proves it over (`auth`).
    pub nonce: auth::Nonce,
}

impl Hello {
    pub fn new(volume_id: &str, generation: Generation, from: &str, params: ThinParams) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            volume_id: volume_id.to_string(),
            generation,
            from: from.to_string(),
            size: params.size,
            block_size: params.block_size,
            restore: None,
            base: None,
            forward: None,
            copied_whole: false,
            nonce: auth::nonce(),
        }
    }

    pub fn params(&self) -> ThinParams {
        ThinParams {
            size: self.size,
            block_size: self.block_size,
        }
    }
}

/// Why a server refused a request (or the Hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The replica has seen a newer generation: the client is fenced.
    Fenced,
    /// The client speaks another protocol version.
    Version,
    /// A malformed or unexpected frame.
    Protocol,
    /// The request is invalid (range, volume id, parameters).
    Invalid,
    /// The replica's engine failed.
    Io,
    /// What the request names (a snapshot) does not exist.
    NotFound,
    /// The replica is open: a restore must wait until it is closed.
    Busy,
    /// The peer does not hold this node's cluster secret (or holds one
    /// where this node has none).
    Unauthorized,
}

impl ErrorCode {
    fn to_u8(self) -> u8 {
        match self {
            ErrorCode::Fenced => 1,
            ErrorCode::Version => 2,
            ErrorCode::Protocol => 3,
            ErrorCode::Invalid => 4,
            ErrorCode::Io => 5,
            ErrorCode::NotFound => 6,
            ErrorCode::Busy => 7,
            ErrorCode::Unauthorized => 8,
        }
    }

    fn from_u8(v: u8) -> Result<ErrorCode, WireError> {
        Ok(match v {
            1 => ErrorCode::Fenced,
            2 => ErrorCode::Version,
            3 => ErrorCode::Protocol,
            4 => ErrorCode::Invalid,
            5 => ErrorCode::Io,
            6 => ErrorCode::NotFound,
            7 => ErrorCode::Busy,
            8 => ErrorCode::Unauthorized,
            _ => return Err(WireError::Malformed(format!("unknown error code {v}"))),
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorCode::Fenced => "fenced",
            ErrorCode::Version => "protocol version",
            ErrorCode::Protocol => "protocol",
            ErrorCode::Invalid => "invalid request",
            ErrorCode::Io => "io",
            ErrorCode::NotFound => "not found",
            ErrorCode::Busy => "busy",
            ErrorCode::Unauthorized => "unauthorized",
        })
    }
}

/// A request after the Hello. Its generation is the session's (the Hello's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Discard `len` bytes: they read as zeros afterwards.
    Discard {
        offset: u64,
        len: u64,
    },
    /// Make every write acknowledged before it durable.
    Flush,
    /// The SHA-256 of `len` bytes at `offset` (a Data reply of 32 bytes):
    /// replicas are compared without sending their data.
    Digest {
        offset: u64,
        len: u32,
    },
    /// Take a snapshot of the replica under `name` (it flushes first). The
    /// client sends it with no write in flight, to every replica at once.
    Snapshot {
        name: String,
    },
    /// Delete the replica's snapshot `name` (`NotFound` if it has none).
    DeleteSnapshot {
        name: String,
    },
    /// The replica's activity log: a Data reply of its last clear's stamp
    /// then the extents active, little-endian u64s
    /// (`activity::encode_reply`).
    Activity,
    /// Clear `count` extents of the activity log from `first` (past the
    /// end: up to it), as clear `seq` of the session's generation: the
    /// client knows them equal on every replica.
    Deactivate {
        first: u64,
        count: u64,
        seq: u64,
    },
    /// Mark every extent of the activity log active: the replica's image
    /// is unknown and about to be copied whole into, so its log must hide
    /// nothing from a later resync (until every replica is in sync).
    ActivateAll,
}

/// One frame, either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloOk {
        version: u32,
        /// The server's node name.
        node: String,
        /// Which image the replica is (see `Incarnation`): one other than
        /// the cluster recorded lost its files, and is not in sync.
        incarnation: u64,
        /// The replica's generation before this Hello (0 where no replica
        /// is opened): an in-sync replica older than the others was rolled
        /// back (its files restored from a backup).
        generation: u64,
    },
    Request {
        id: u64,
        req: Request,
    },
    Ok {
        id: u64,
    },
    Data {
        id: u64,
        data: Vec<u8>,
    },
    Error {
        id: u64,
        code: ErrorCode,
        message: String,
    },
    /// A server with a cluster secret, to a Hello: its nonce, and its
    /// proof over both nonces and its name.
    Challenge {
        nonce: auth::Nonce,
        proof: auth::Proof,
    },
    /// The client's answer to a Challenge.
    Proof {
        proof: auth::Proof,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("not a dunnage replication peer (bad magic)")]
    BadMagic,
    #[error(
        "protocol version {theirs} is not supported: this node speaks version \
         {PROTOCOL_VERSION}; run the same dunnage version on every node"
    )]
    Version { theirs: u32 },
}

impl Frame {
    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[0; 4]);
        let (kind, id) = match self {
            Frame::Hello(_) => (KIND_HELLO, 0),
            Frame::HelloOk { .. } => (KIND_HELLO_OK, 0),
            Frame::Request { id, req } => (
                match req {
                    Request::Read { .. } => KIND_READ,
                    Request::Write { .. } => KIND_WRITE,
                    Request::Discard { .. } => KIND_DISCARD,
                    Request::Flush => KIND_FLUSH,
                    Request::Digest { .. } => KIND_DIGEST,
                    Request::Snapshot { .. } => KIND_SNAPSHOT,
                    Request::DeleteSnapshot { .. } => KIND_DELETE_SNAPSHOT,
                    Request::Activity => KIND_ACTIVITY,
                    Request::Deactivate { .. } => KIND_DEACTIVATE,
                    Request::ActivateAll => KIND_ACTIVATE_ALL,
                },
                *id,
            ),
            Frame::Ok { id } => (KIND_OK, *id),
            Frame::Data { id, .. } => (KIND_DATA, *id),
            Frame::Error { id, .. } => (KIND_ERROR, *id),
            Frame::Challenge { .. } => (KIND_CHALLENGE, 0),
            Frame::Proof { .. } => (KIND_PROOF, 0),
        };
        b.push(kind);
        b.extend_from_slice(&id.to_be_bytes());
        match self {
            Frame::Hello(h) => {
                b.extend_from_slice(&MAGIC);
                b.extend_from_slice(&h.version.to_be_bytes());
                put_str(&mut b, &h.volume_id);
                b.extend_from_slice(&h.generation.to_be_bytes());
                put_str(&mut b, &h.from);
                b.extend_from_slice(&h.size.to_be_bytes());
                b.extend_from_slice(&h.block_size.to_be_bytes());
                match &h.restore {
                    None => b.push(0),
                    Some(snapshot) => {
                        b.push(1);
                        put_str(&mut b, snapshot);
                    }
                }
                match &h.base {
                    None => b.push(0),
                    Some(base) => {
                        b.push(1);
                        put_str(&mut b, &base.volume_id);
                        put_str(&mut b, &base.snapshot);
                    }
                }
                match &h.forward {
                    None => b.push(0),
                    Some(request) => {
                        b.push(1);
                        put_str(&mut b, request);
                    }
                }
                b.push(u8::from(h.copied_whole));
                b.extend_from_slice(&h.nonce);
            }
            Frame::HelloOk {
                version,
                node,
                incarnation,
                generation,
            } => {
                b.extend_from_slice(&version.to_be_bytes());
                put_str(&mut b, node);
                b.extend_from_slice(&incarnation.to_be_bytes());
                b.extend_from_slice(&generation.to_be_bytes());
            }
            Frame::Request { req, .. } => match req {
                Request::Read { offset, len } | Request::Digest { offset, len } => {
                    b.extend_from_slice(&offset.to_be_bytes());
                    b.extend_from_slice(&len.to_be_bytes());
                }
                Request::Write { offset, data } => {
                    b.extend_from_slice(&offset.to_be_bytes());
                    b.extend_from_slice(data);
                }
                Request::Discard { offset, len } => {
                    b.extend_from_slice(&offset.to_be_bytes());
                    b.extend_from_slice(&len.to_be_bytes());
                }
                Request::Flush | Request::Activity | Request::ActivateAll => {}
                Request::Deactivate { first, count, seq } => {
                    b.extend_from_slice(&first.to_be_bytes());
                    b.extend_from_slice(&count.to_be_bytes());
                    b.extend_from_slice(&seq.to_be_bytes());
                }
                Request::Snapshot { name } | Request::DeleteSnapshot { name } => {
                    put_str(&mut b, name)
                }
            },
            Frame::Ok { .. } => {}
            Frame::Data { data, .. } => b.extend_from_slice(data),
            Frame::Error { code, message, .. } => {
                b.push(code.to_u8());
                put_str(&mut b, message);
            }
            Frame::Challenge { nonce, proof } => {
                b.extend_from_slice(nonce);
                b.extend_from_slice(proof);
            }
            Frame::Proof { proof } => b.extend_from_slice(proof),
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b
    }

    /// Decode one frame's body (what follows the length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
        let mut r = Reader { buf: body, pos: 0 };
        let kind = r.u8()?;
        let id = r.u64()?;
        let frame = match kind {
            KIND_HELLO => {
                if r.take(MAGIC.len())? != MAGIC {
                    return Err(WireError::BadMagic);
                }
                let version = r.u32()?;
                if version != PROTOCOL_VERSION {
                    // The rest may have another layout: do not read it.
                    return Err(WireError::Version { theirs: version });
                }
                Frame::Hello(Hello {
                    version,
                    volume_id: r.str()?,
                    generation: r.u64()?,
                    from: r.str()?,
                    size: r.u64()?,
                    block_size: r.u32()?,
                    restore: match r.u8()? {
                        0 => None,
                        1 => Some(r.str()?),
                        v => return Err(WireError::Malformed(format!("restore flag {v}"))),
                    },
                    base: match r.u8()? {
                        0 => None,
                        1 => Some(ReplicaBase {
                            volume_id: r.str()?,
                            snapshot: r.str()?,
                        }),
                        v => return Err(WireError::Malformed(format!("base flag {v}"))),
                    },
                    forward: match r.u8()? {
                        0 => None,
                        1 => Some(r.str()?),
                        v => return Err(WireError::Malformed(format!("forward flag {v}"))),
                    },
                    copied_whole: match r.u8()? {
                        0 => false,
                        1 => true,
                        v => return Err(WireError::Malformed(format!("copied-whole flag {v}"))),
                    },
                    nonce: r.array()?,
                })
            }
            KIND_HELLO_OK => Frame::HelloOk {
                version: r.u32()?,
                node: r.str()?,
                incarnation: r.u64()?,
                generation: r.u64()?,
            },
            KIND_CHALLENGE => Frame::Challenge {
                nonce: r.array()?,
                proof: r.array()?,
            },
            KIND_PROOF => Frame::Proof { proof: r.array()? },
            KIND_ERROR => Frame::Error {
                id,
                code: ErrorCode::from_u8(r.u8()?)?,
                message: r.str()?,
            },
            KIND_READ => Frame::Request {
                id,
                req: Request::Read {
                    offset: r.u64()?,
                    len: r.u32()?,
                },
            },
            KIND_WRITE => Frame::Request {
                id,
                req: Request::Write {
                    offset: r.u64()?,
                    data: r.rest().to_vec(),
                },
            },
            KIND_DISCARD => Frame::Request {
                id,
                req: Request::Discard {
                    offset: r.u64()?,
                    len: r.u64()?,
                },
            },
            KIND_FLUSH => Frame::Request {
                id,
                req: Request::Flush,
            },
            KIND_DIGEST => Frame::Request {
                id,
                req: Request::Digest {
                    offset: r.u64()?,
                    len: r.u32()?,
                },
            },
            KIND_SNAPSHOT => Frame::Request {
                id,
                req: Request::Snapshot { name: r.str()? },
            },
            KIND_DELETE_SNAPSHOT => Frame::Request {
                id,
                req: Request::DeleteSnapshot { name: r.str()? },
            },
            KIND_ACTIVITY => Frame::Request {
                id,
                req: Request::Activity,
            },
            KIND_DEACTIVATE => Frame::Request {
                id,
                req: Request::Deactivate {
                    first: r.u64()?,
                    count: r.u64()?,
                    seq: r.u64()?,
                },
            },
            KIND_ACTIVATE_ALL => Frame::Request {
                id,
                req: Request::ActivateAll,
            },
            KIND_OK => Frame::Ok { id },
            KIND_DATA => Frame::Data {
                id,
                data: r.rest().to_vec(),
            },
            k => return Err(WireError::Malformed(format!("unknown frame kind {k}"))),
        };
        if r.pos != body.len() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes after a frame of kind {kind}",
                body.len() - r.pos
            )));
        }
        Ok(frame)
    }
}

/// A Write request frame, encoded straight from the caller's buffer (the
/// same bytes as `Frame::Request { id, req: Request::Write { .. } }`).
pub fn encode_write(id: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 1 + 8 + 8 + data.len());
    b.extend_from_slice(&write_header(id, offset, data.len()));
    b.extend_from_slice(data);
    b
}

/// The first bytes of a Write request frame carrying `len` bytes of data
/// (which follow them on the wire).
pub fn write_header(id: u64, offset: u64, len: usize) -> [u8; 21] {
    let mut b = [0u8; 21];
    b[..4].copy_from_slice(&((1 + 8 + 8 + len) as u32).to_be_bytes());
    b[4] = KIND_WRITE;
    b[5..13].copy_from_slice(&id.to_be_bytes());
    b[13..21].copy_from_slice(&offset.to_be_bytes());
    b
}

/// The first bytes of a Data reply frame carrying `len` bytes of data
/// (which follow them on the wire).
pub fn data_header(id: u64, len: usize) -> [u8; 13] {
    let mut b = [0u8; 13];
    b[..4].copy_from_slice(&((1 + 8 + len) as u32).to_be_bytes());
    b[4] = KIND_DATA;
    b[5..13].copy_from_slice(&id.to_be_bytes());
    b
}

/// Idle time before a replica link's first keepalive probe, the time
/// between probes, and how many may go unanswered: a peer that vanished
/// without a FIN or RST (power loss, a pulled cable) is dropped after
/// about 20 s even when no IO is waiting on the link.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 5;

/// Set up a replica link's socket (both ends): no Nagle delay (every frame
/// is waited for), and TCP keepalive.
pub fn tune_socket(stream: &std::net::TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Read one frame. `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, WireError> {
    read_frame_reusing(r, &mut Vec::new())
}

/// [`read_frame`], reading a Write's or a Data's payload into `spare`'s
/// allocation (which the frame then owns): a server worker hands back each
/// request's buffer, so a 1 MiB write costs no mmap and no page faults
/// (glibc mmaps blocks that big, see sys/malloc.rs).
pub fn read_frame_reusing(
    r: &mut impl Read,
    spare: &mut Vec<u8>,
) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    // A clean EOF is only one at a frame boundary.
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if len >= 9 {
        // Read a payload straight into its own buffer, not into the body
        // and then copied out of it.
        let mut head = [0u8; 9 + 8];
        r.read_exact(&mut head[..9])?;
        let id = u64::from_be_bytes(head[1..9].try_into().unwrap());
        match head[0] {
            KIND_WRITE if len >= 17 => {
                r.read_exact(&mut head[9..])?;
                let offset = u64::from_be_bytes(head[9..].try_into().unwrap());
                let data = read_payload(r, len - 17, spare)?;
                let req = Request::Write { offset, data };
                return Ok(Some(Frame::Request { id, req }));
            }
            KIND_DATA => {
                let data = read_payload(r, len - 9, spare)?;
                return Ok(Some(Frame::Data { id, data }));
            }
            _ => {
                let mut body = vec![0u8; len];
                body[..9].copy_from_slice(&head[..9]);
                r.read_exact(&mut body[9..])?;
                return Frame::decode(&body).map(Some);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Frame::decode(&body).map(Some)
}

/// Exactly `n` bytes from `r`, in `spare`'s allocation. Bytes it already
/// holds are overwritten, not zeroed first: a run of same-sized writes
/// zeroes nothing.
fn read_payload(r: &mut impl Read, n: usize, spare: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let mut data = std::mem::take(spare);
    if data.len() < n {
        data.resize(n, 0);
    } else {
        data.truncate(n);
    }
    r.read_exact(&mut data)?;
    Ok(data)
}

/// `write_all` of the concatenation of `parts`, vectored: a frame's header
/// and its payload leave in one syscall, without copying them together.
pub fn write_parts(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..].iter().map(|p| IoSlice::new(p)).collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if n > 0 {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}

/// Write one frame (already encoded).
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), WireError> {
    w.write_all(&frame.encode())?;
    Ok(())
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Strings on the wire are names and messages: cut, never fail.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.extend_from_slice(&(end as u16).to_be_bytes());
    b.extend_from_slice(&s.as_bytes()[..end]);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() - self.pos < n {
            return Err(WireError::Malformed(format!(
                "truncated: needed {n} bytes at {}, frame has {}",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = u16::from_be_bytes(self.take(2)?.try_into().unwrap()) as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| WireError::Malformed("string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        let back = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(back, f);
    }

    fn fixture_hello() -> Hello {
        Hello {
            nonce: std::array::from_fn(|i| i as u8),
            ..Hello::new(
                "0123456789abcdef0123456789abcdef",
                42,
                "node-a",
                ThinParams {
                    size: 1 << 30,
                    block_size: 32 << 10,
                },
            )
        }
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Hello(fixture_hello()));
        roundtrip(Frame::Challenge {
            nonce: [3; 32],
            proof: [4; 32],
        });
        roundtrip(Frame::Proof { proof: [5; 32] });
        roundtrip(Frame::Hello(Hello {
            restore: Some("before-upgrade".into()),
            ..fixture_hello()
        }));
        roundtrip(Frame::Hello(Hello {
            base: Some(ReplicaBase {
                volume_id: "fedcba9876543210".into(),
                snapshot: "clone-0123".into(),
            }),
            ..fixture_hello()
        }));
        roundtrip(Frame::Hello(Hello {
            forward: Some(r#"{"volume":"pg","op":{"take_snapshot":{"name":"a"}}}"#.into()),
            ..fixture_hello()
        }));
        roundtrip(Frame::Hello(Hello {
            copied_whole: true,
            ..fixture_hello()
        }));
        roundtrip(Frame::HelloOk {
            version: PROTOCOL_VERSION,
            node: "node-b".into(),
            incarnation: 0x0123_4567_89ab_cdef,
            generation: 41,
        });
        for req in [
            Request::Read {
                offset: 1 << 40,
                len: 4096,
            },
            Request::Write {
                offset: 8192,
                data: vec![1, 2, 3, 4, 5],
            },
            Request::Write {
                offset: 0,
                data: vec![],
            },
            Request::Discard {
                offset: 4096,
                len: 1 << 33,
            },
            Request::Flush,
            Request::Digest {
                offset: 1 << 40,
                len: 1 << 20,
            },
            Request::Snapshot {
                name: "daily-2026".into(),
            },
            Request::DeleteSnapshot {
                name: "daily-2026".into(),
            },
            Request::Activity,
            Request::Deactivate {
                first: 3,
                count: u64::MAX,
                seq: 7,
            },
            Request::ActivateAll,
        ] {
            roundtrip(Frame::Request { id: 77, req });
        }
        roundtrip(Frame::Ok { id: u64::MAX });
        roundtrip(Frame::Data {
            id: 3,
            data: vec![9; 10_000],
        });
        for code in [
            ErrorCode::Fenced,
            ErrorCode::Version,
            ErrorCode::Protocol,
            ErrorCode::Invalid,
            ErrorCode::Io,
            ErrorCode::NotFound,
            ErrorCode::Busy,
        ] {
            roundtrip(Frame::Error {
                id: 5,
                code,
                message: "no — ünïcode ok".into(),
            });
        }
    }

    #[test]
    fn encode_write_matches_the_frame() {
        let data = vec![5u8; 3000];
        assert_eq!(
            encode_write(9, 4096, &data),
            Frame::Request {
                id: 9,
                req: Request::Write { offset: 4096, data }
            }
            .encode()
        );
    }

    /// The Hello layout is what other versions must keep reading: pinned
    /// by a fixture per version.
    #[test]
    fn hello_matches_fixture() {
        let fixture = include_bytes!("../../fixtures/replication/hello-v9.bin");
        assert_eq!(Frame::Hello(fixture_hello()).encode(), fixture.to_vec());
        assert_eq!(
            read_frame(&mut &fixture[..]).unwrap().unwrap(),
            Frame::Hello(fixture_hello())
        );
        // Nodes of older versions (no Digest, Snapshot, forward, prior
        // generation, incarnation) are told what to do.
        let old: [(&[u8], u32); 8] = [
            (include_bytes!("../../fixtures/replication/hello-v1.bin"), 1),
            (include_bytes!("../../fixtures/replication/hello-v2.bin"), 2),
            (include_bytes!("../../fixtures/replication/hello-v3.bin"), 3),
            (include_bytes!("../../fixtures/replication/hello-v4.bin"), 4),
            (include_bytes!("../../fixtures/replication/hello-v5.bin"), 5),
            (include_bytes!("../../fixtures/replication/hello-v6.bin"), 6),
            (include_bytes!("../../fixtures/replication/hello-v7.bin"), 7),
            (include_bytes!("../../fixtures/replication/hello-v8.bin"), 8),
        ];
        for (bytes, version) in old {
            match read_frame(&mut &bytes[..]) {
                Err(e @ WireError::Version { theirs }) if theirs == version => {
                    assert!(e.to_string().contains("same dunnage version"), "{e}")
                }
                other => panic!("a v{version} hello: {other:?}"),
            }
        }
    }

    #[test]
    fn other_version_is_refused_without_reading_the_rest() {
        let mut bytes = Frame::Hello(fixture_hello()).encode();
        // Version sits after length, kind, id and magic.
        let next = PROTOCOL_VERSION + 1;
        bytes[4 + 1 + 8 + 8..4 + 1 + 8 + 8 + 4].copy_from_slice(&next.to_be_bytes());
        // A later version's Hello may be longer: append garbage.
        bytes.extend_from_slice(&[0xFF; 9]);
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        let err = read_frame(&mut &bytes[..]).unwrap_err();
        assert!(
            matches!(err, WireError::Version { theirs } if theirs == next),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("version {next}")),
            "{err}"
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut hello = Frame::Hello(fixture_hello()).encode();
        hello[4 + 1 + 8] = b'X';
        assert!(matches!(
            read_frame(&mut &hello[..]),
            Err(WireError::BadMagic)
        ));
        // Truncated body.
        let full = Frame::Request {
            id: 1,
            req: Request::Read { offset: 0, len: 1 },
        }
        .encode();
        let mut cut = full[..full.len() - 2].to_vec();
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &cut[..]),
            Err(WireError::Malformed(_))
        ));
        // Truncated stream.
        assert!(matches!(
            read_frame(&mut &full[..full.len() - 1]),
            Err(WireError::Io(_))
        ));
        // Trailing bytes.
        let mut long = Frame::Ok { id: 1 }.encode();
        long.push(0);
        let len = (long.len() - 4) as u32;
        long[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &long[..]),
            Err(WireError::Malformed(_))
        ));
        // Unknown kind, unknown error code, oversized frame.
        let mut unknown = Frame::Ok { id: 1 }.encode();
        unknown[4] = 200;
        assert!(matches!(
            read_frame(&mut &unknown[..]),
            Err(WireError::Malformed(_))
        ));
        let mut code = Frame::Error {
            id: 1,
            code: ErrorCode::Io,
            message: String::new(),
        }
        .encode();
        code[4 + 1 + 8] = 99;
        assert!(matches!(
            read_frame(&mut &code[..]),
            Err(WireError::Malformed(_))
        ));
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(WireError::TooLarge(_))
        ));
        // Clean EOF at a frame boundary.
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    /// Takes at most `max` bytes per call, like a socket with a full buffer.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_parts_survives_partial_writes() {
        let header = write_header(7, 4096, 10);
        let data: Vec<u8> = (0..10).collect();
        for max in [1, 3, 20, 21, 22, 100] {
            let mut w = Trickle {
                got: Vec::new(),
                max,
            };
            write_parts(&mut w, &[&header, &[], &data]).unwrap();
            assert_eq!(w.got, encode_write(7, 4096, &data), "max {max}");
        }
    }

    #[test]
    fn a_data_header_and_its_payload_are_a_data_frame() {
        let data: Vec<u8> = (0..=255).cycle().take(5000).collect();
        let mut wire = data_header(9, data.len()).to_vec();
        wire.extend_from_slice(&data);
        assert_eq!(
            wire,
            Frame::Data {
                id: 9,
                data: data.clone()
            }
            .encode()
        );
    }

    #[test]
    fn payloads_are_read_into_the_spare_allocation() {
        let big: Vec<u8> = (0..=255).cycle().take(1 << 20).collect();
        let small = vec![7u8; 4096];
        let mut stream = encode_write(1, 0, &big);
        stream.extend(encode_write(2, 1 << 20, &small));
        stream.extend(
            Frame::Data {
                id: 3,
                data: small.clone(),
            }
            .encode(),
        );
        let mut r = &stream[..];
        let mut spare = Vec::with_capacity(1 << 20);
        let at = spare.as_ptr();
        let mut expect = [(1u64, 0u64, &big), (2, 1 << 20, &small)].into_iter();
        for _ in 0..2 {
            let (id, offset, data) = expect.next().unwrap();
            match read_frame_reusing(&mut r, &mut spare).unwrap().unwrap() {
                Frame::Request {
                    id: got_id,
                    req: Request::Write { offset: o, data: d },
                } => {
                    assert_eq!((got_id, o), (id, offset));
                    assert_eq!(&d, data);
                    assert_eq!(d.as_ptr(), at, "the payload reused the spare buffer");
                    spare = d;
                }
                other => panic!("expected a write, got {other:?}"),
            }
        }
        match read_frame_reusing(&mut r, &mut spare).unwrap().unwrap() {
            Frame::Data { id: 3, data } => {
                assert_eq!(data, small);
                assert_eq!(data.as_ptr(), at);
            }
            other => panic!("expected data, got {other:?}"),
        }
        assert!(read_frame_reusing(&mut r, &mut spare).unwrap().is_none());
        // A payload cut short is an error, not a short write.
        let cut = encode_write(4, 0, &small);
        let mut spare = Vec::new();
        assert!(matches!(
            read_frame_reusing(&mut &cut[..cut.len() - 1], &mut spare),
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
    }

    #[test]
    fn link_sockets_have_keepalive_and_no_delay() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tune_socket(&s).unwrap();
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(r.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(r.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert!(s.nodelay().unwrap());
    }
}
