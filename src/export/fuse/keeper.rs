//! The FUSE keeper: a small process (`dunnage fuse-keeper`) that holds each
//! FUSE-exported volume's `/dev/fuse` and loop device descriptors.
//!
//! A FUSE connection dies with the last open `/dev/fuse` descriptor, and the
//! kernel fails every request that was on it. With a copy held here, a
//! `dunnage serve` killed with -9 leaves its connections alive: requests
//! wait (they are not failed), the loop devices stay, the filesystems stay
//! mounted, and the next daemon fetches the descriptors back, resumes
//! serving and has the kernel resend what the dead one had read
//! (FUSE_NOTIFY_RESEND). The keeper never does IO on a volume, so it can
//! never deadlock on one.
//!
//! Protocol: one `SOCK_SEQPACKET` message per request and per answer, text
//! plus `SCM_RIGHTS`: `hello`, `hold KEY` (+fds), `fetch KEY`, `release KEY`,
//! `keys`, `bye`. Answers start with `ok` or `err`. One client at a time:
//! the daemon, which a data-dir lock makes unique.

use nix::cmsg_space;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    accept, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const SOCKET: &str = "fuse-keeper.sock";
const LOCK: &str = "fuse-keeper.lock";
const LOG: &str = "fuse-keeper.log";
/// Descriptors per key: `/dev/fuse` and the loop device.
const MAX_FDS: usize = 4;
/// Room for a `keys` answer with thousands of volume ids.
const MAX_MSG: usize = 256 * 1024;

fn seqpacket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

fn send(sock: &OwnedFd, text: &str, fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// One message; `None` at end of stream.
fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut space = cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(owned));
        }
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&iov[0][..n]).into_owned();
    Ok(Some((text, fds)))
}

fn owned(raw: RawFd) -> OwnedFd {
    crate::sys::fd::adopt(raw)
}

/// The daemon's side.
pub struct Keeper {
    run_dir: PathBuf,
    conn: Mutex<OwnedFd>,
    pid: u32,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keeper(pid {}, {})", self.pid, self.run_dir.display())
    }
}

impl Keeper {
    /// Connect to the keeper of `run_dir`, starting one if none runs.
    pub fn connect(run_dir: &Path) -> io::Result<Keeper> {
        let path = run_dir.join(SOCKET);
        if let Ok(k) = Self::try_connect(run_dir, &path) {
            return Ok(k);
        }
        spawn(run_dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::try_connect(run_dir, &path) {
                Ok(k) => return Ok(k),
                Err(e) if Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "the FUSE keeper did not answer on {} ({e}); see {}",
                            path.display(),
                            run_dir.join(LOG).display()
                        ),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn try_connect(run_dir: &Path, path: &Path) -> io::Result<Keeper> {
        let sock = seqpacket()?;
        connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
        let timeout = Some(Duration::from_secs(10));
        let s = std::os::unix::net::UnixStream::from(sock);
        s.set_read_timeout(timeout)?;
        let sock = OwnedFd::from(s);
        let mut k = Keeper {
            run_dir: run_dir.to_path_buf(),
            conn: Mutex::new(sock),
            pid: 0,
        };
        let (answer, _) = k.request("hello", &[])?;
        k.pid = answer.trim().parse().unwrap_or(0);
        Ok(k)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn request(&self, text: &str, fds: &[RawFd]) -> io::Result<(String, Vec<OwnedFd>)> {
        let conn = self.conn.lock();
        send(&conn, text, fds)?;
        let mut buf = vec![0u8; MAX_MSG];
        match recv(&conn, &mut buf)? {
            None => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the FUSE keeper went away",
            )),
            Some((answer, fds)) => match answer.strip_prefix("ok") {
                Some(rest) => Ok((rest.trim().to_string(), fds)),
                None => Err(io::Error::other(format!("FUSE keeper: {answer}"))),
            },
        }
    }

    /// Hold copies of `fds` under `key` (replacing what was held).
    pub fn hold(&self, key: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.request(&format!("hold {key}"), &raw).map(|_| ())
    }

    /// Copies of what is held under `key`, if anything (the keeper keeps its own).
    pub fn fetch(&self, key: &str) -> io::Result<Option<Vec<OwnedFd>>> {
        let (rest, fds) = self.request(&format!("fetch {key}"), &[])?;
        Ok((rest != "none").then_some(fds))
    }

    /// Close what is held under `key`.
    pub fn release(&self, key: &str) -> io::Result<()> {
        self.request(&format!("release {key}"), &[]).map(|_| ())
    }

    pub fn keys(&self) -> io::Result<Vec<String>> {
        let (rest, _) = self.request("keys", &[])?;
        Ok(rest.split_whitespace().map(str::to_string).collect())
    }

    /// Clean shutdown: the keeper exits if it holds nothing.
    pub fn bye(&self) -> io::Result<()> {
        self.request("bye", &[]).map(|_| ())
    }
}

fn spawn(run_dir: &Path) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(LOG))?;
    std::process::Command::new(exe)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("fuse-keeper")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own process group: a `kill -9 -<pgid>` aimed at the daemon's
        // group (a shell job, a supervisor) must not take the keeper too.
        .process_group(0)
        .spawn()?;
    Ok(())
}

/// The keeper process: serve until a `bye` finds nothing held.
pub fn serve(run_dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(run_dir.join(LOCK))?;
    // One keeper per run dir; a second one waits here until the first exits
    // (after it removed its socket), so it can never unlink a live one's.
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
    let path = run_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(&path)?)?;
    listen(&listener, Backlog::new(8).map_err(io::Error::from)?)?;
    tracing::info!(socket = %path.display(), pid = std::process::id(), "FUSE keeper started");

    let mut held: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let conn = match accept(listener.as_raw_fd()) {
            Ok(fd) => owned(fd),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut bye = false;
        loop {
            let (text, fds) = match recv(&conn, &mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "client connection failed");
                    break;
                }
            };
            let mut words = text.split_whitespace();
            let cmd = words.next().unwrap_or("");
            let key = words.next().unwrap_or("");
            let answer: (String, Vec<RawFd>) = match cmd {
                "hello" => (format!("ok {}", std::process::id()), vec![]),
                "hold" if !key.is_empty() && !fds.is_empty() => {
                    tracing::info!(key, fds = fds.len(), "holding");
                    held.insert(key.to_string(), fds);
                    ("ok".into(), vec![])
                }
                "fetch" if !key.is_empty() => match held.get(key) {
                    Some(f) => ("ok".into(), f.iter().map(|f| f.as_raw_fd()).collect()),
                    None => ("ok none".into(), vec![]),
                },
                "release" if !key.is_empty() => {
                    if held.remove(key).is_some() {
                        tracing::info!(key, "released");
                    }
                    ("ok".into(), vec![])
                }
                "keys" => {
                    let keys: Vec<&str> = held.keys().map(String::as_str).collect();
                    (format!("ok {}", keys.join(" ")), vec![])
                }
                "bye" => {
                    bye = true;
                    (format!("ok {}", held.len()), vec![])
                }
                _ => (format!("err unknown request {text:?}"), vec![]),
            };
            if let Err(e) = send(&conn, &answer.0, &answer.1) {
                tracing::warn!(error = %e, "cannot answer the client");
                break;
            }
            if bye {
                break;
            }
        }
        if bye && held.is_empty() {
            let _ = std::fs::remove_file(&path);
            tracing::info!("nothing held and the daemon said bye: exiting");
            return Ok(());
        }
    }
}
