//! `snapshot export` and `volume import`: the stream passes between the
//! daemon and the user's file, stdin or stdout through a FIFO the CLI makes
//! in the run directory (which the daemon sees), so that the daemon never
//! opens the user's paths and a pipe to `ssh` works as well as a file. The
//! CLI copies, counting bytes for its progress display on stderr.

use crate::control::client::Client;
use crate::control::{ExportArgs, ImportArgs};
use crate::volume::backup::TransferSummary;
use anyhow::{bail, Context, Result};
use indicatif::{HumanBytes, ProgressBar};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A FIFO in a directory of its own under the run directory; both go on drop.
struct Fifo {
    dir: PathBuf,
    path: PathBuf,
}

impl Fifo {
    fn new(run_dir: &Path) -> Result<Fifo> {
        prune_dead(&run_dir.join("streams"));
        let dir = run_dir.join("streams").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("stream");
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .with_context(|| format!("make the FIFO {}", path.display()))?;
        Ok(Fifo { dir, path })
    }

    /// Wake a copier still waiting in `open` for the daemon, which will not
    /// come (it refused the request): it then meets the end of the stream.
    fn release(&self, copier_reads: bool) {
        let mut o = OpenOptions::new();
        if copier_reads {
            o.write(true);
        } else {
            o.read(true);
        }
        let _ = o.custom_flags(libc::O_NONBLOCK).open(&self.path);
    }
}

/// Remove the FIFOs of CLIs killed before their drop ran (`export | head`
/// ends with SIGPIPE): each directory is named after its CLI's pid.
fn prune_dead(streams: &Path) {
    let Ok(entries) = std::fs::read_dir(streams) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .map(|(p, _)| p);
        let Some(pid) = pid.filter(|p| p.parse::<u32>().is_ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(e.path().join("stream"));
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Copy `from` to `to`, counting on `bar`.
fn copy(mut from: impl Read, mut to: impl Write, bar: &ProgressBar) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
        bar.set_position(total);
    }
    to.flush()?;
    Ok(total)
}

fn said(s: &TransferSummary) -> String {
    let since = s
        .since
        .as_deref()
        .map(|b| format!(" since {b}"))
        .unwrap_or_default();
    format!(
        "{}@{}{since}: {} of data, {} zeroed",
        s.volume,
        s.snapshot,
        HumanBytes(s.data_bytes),
        HumanBytes(s.zero_bytes)
    )
}

/// `dunnage snapshot export`.
pub fn export(
    run_dir: &Path,
    volume: String,
    snapshot: String,
    since: Option<String>,
    output: Option<PathBuf>,
) -> Result<()> {
    let to_stdout = output.as_deref().map_or(true, |p| p == Path::new("-"));
    let out: Box<dyn Write + Send> = if to_stdout {
        if std::io::stdout().is_terminal() {
            bail!("the export stream is binary: redirect it (`> FILE`, `| ssh HOST dunnage volume import NAME`) or give --output FILE");
        }
        Box::new(std::io::stdout())
    } else {
        let p = output.as_deref().expect("a path");
        Box::new(File::create(p).with_context(|| format!("create {}", p.display()))?)
    };
    let fifo = Fifo::new(run_dir)?;
    let bar = super::bytes_bar(format!("export {volume}@{snapshot}"), None);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let (path, b) = (fifo.path.clone(), bar.clone());
    let copier = std::thread::spawn(move || copy(File::open(path)?, out, &b));
    let args = ExportArgs {
        volume,
        snapshot,
        since,
        path: fifo.path.clone(),
    };
    let res: Result<TransferSummary, _> = Client::new(run_dir).post("/v1/snapshot/export", &args);
    if res.is_err() {
        fifo.release(true);
    }
    let copied = copier.join().expect("the copier does not panic");
    bar.finish_and_clear();
    let done = res.map_err(anyhow::Error::from).and_then(|s| {
        copied.context("write the stream")?;
        Ok(s)
    });
    let summary = match done {
        Ok(s) => s,
        Err(e) => {
            // Never leave a partial stream behind as if it were one.
            if let Some(p) = output.filter(|_| !to_stdout) {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    if let Some(p) = output.filter(|_| !to_stdout) {
        File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("sync {}", p.display()))?;
    }
    eprintln!("exported {}", said(&summary));
    Ok(())
}

/// `dunnage volume import`.
pub fn import(
    run_dir: &Path,
    name: String,
    input: Option<PathBuf>,
    opts: BTreeMap<String, String>,
) -> Result<()> {
    let from_stdin = input.as_deref().map_or(true, |p| p == Path::new("-"));
    let (src, total): (Box<dyn Read + Send>, Option<u64>) = if from_stdin {
        if std::io::stdin().is_terminal() {
            bail!("the stream comes on stdin (`< FILE`, or a pipe from `dunnage snapshot export`), or give --input FILE");
        }
        (Box::new(std::io::stdin()), None)
    } else {
        let p = input.as_deref().expect("a path");
        let f = File::open(p).with_context(|| format!("open {}", p.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let fifo = Fifo::new(run_dir)?;
    let bar = super::bytes_bar(format!("import {name}"), total);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let (path, b) = (fifo.path.clone(), bar.clone());
    let copier = std::thread::spawn(move || {
        let to = OpenOptions::new().write(true).open(path)?;
        copy(src, to, &b)
    });
    let args = ImportArgs {
        name,
        path: fifo.path.clone(),
        opts,
    };
    let res: Result<TransferSummary, _> = Client::new(run_dir).post("/v1/volume/import", &args);
    bar.finish_and_clear();
    let summary = match res {
        Ok(s) => s,
        Err(e) => {
            // The copier may wait for a reader that will not come, or
            // still hold stdin: it ends with the process.
            fifo.release(false);
            return Err(e.into());
        }
    };
    // The daemon read the stream to its end record.
    let _ = copier.join();
    eprintln!("imported {}", said(&summary));
    Ok(())
}
