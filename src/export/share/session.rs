//! A shared volume's sessions over the replica port: the holder's side
//! runs a [`ShareServer`] on the connection's thread; a client's side is a
//! [`Transport`] that sends one request at a time.

use super::client::Transport;
use super::proto::{self, Reply, Request};
use super::server::ShareServer;
use parking_lot::Mutex;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// How long a client waits for one reply before it gives the session up
/// (an fsync of much data may take a while; a dead holder must not hang
/// its clients' processes for ever).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Serve `stream`'s requests on the tree at `root` until the client goes.
/// `what` names the session in the log.
pub fn serve(root: &Path, stream: TcpStream, what: &str) {
    let mut server = match ShareServer::new(root) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(session = what, root = %root.display(), error = %e, "cannot serve a shared volume");
            return;
        }
    };
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    tracing::info!(session = what, "shared volume: session open");
    let mut reader = BufReader::with_capacity(proto::MAX_FRAME / 8, read_half);
    let mut writer = BufWriter::with_capacity(proto::MAX_FRAME / 8, &stream);
    let why = loop {
        let req: Request = match proto::recv(&mut reader) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break None,
            Err(e) => break Some(e),
        };
        if let Some(reply) = server.handle(req) {
            if let Err(e) = proto::send(&mut writer, &reply).and_then(|()| writer.flush()) {
                break Some(e);
            }
        }
    };
    match why {
        None => tracing::info!(session = what, "shared volume: session closed"),
        Some(e) => {
            tracing::warn!(session = what, error = %e, "shared volume: session ended")
        }
    }
}

/// A client's end of one session.
pub struct TcpTransport {
    conn: Mutex<Option<Conn>>,
    /// "volume V on node N", for the log.
    what: String,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl TcpTransport {
    pub fn new(stream: TcpStream, what: String) -> io::Result<TcpTransport> {
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let reader = BufReader::with_capacity(proto::MAX_FRAME / 8, stream.try_clone()?);
        let writer = BufWriter::with_capacity(proto::MAX_FRAME / 8, stream);
        Ok(TcpTransport {
            conn: Mutex::new(Some(Conn { reader, writer })),
            what,
        })
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> io::Result<T>) -> io::Result<T> {
        let mut guard = self.conn.lock();
        let Some(conn) = guard.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("the session to {} is gone", self.what),
            ));
        };
        let r = f(conn);
        if let Err(e) = &r {
            tracing::warn!(session = %self.what, error = %e, "shared volume: the session to the holder is gone; unmount and mount the volume again");
            if let Some(c) = guard.take() {
                let _ = c.writer.get_ref().shutdown(std::net::Shutdown::Both);
            }
        }
        r
    }
}

impl Transport for TcpTransport {
    fn call(&self, req: Request) -> io::Result<Reply> {
        self.with_conn(|c| {
            proto::send(&mut c.writer, &req)?;
            c.writer.flush()?;
            proto::recv(&mut c.reader)
        })
    }

    fn cast(&self, req: Request) -> io::Result<()> {
        self.with_conn(|c| {
            proto::send(&mut c.writer, &req)?;
            c.writer.flush()
        })
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        if let Some(c) = self.conn.lock().take() {
            let _ = c.writer.get_ref().shutdown(std::net::Shutdown::Both);
        }
    }
}
