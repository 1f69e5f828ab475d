//! The `dunnage` binary: the daemon (`serve`) and the operator's CLI.
//! anyhow lives here only.

use clap::{Parser, Subcommand};
use dunnage::cli::cluster::{NodeCmd, ReplicaCmd};
use dunnage::cli::{self, SnapshotCmd, VolumeCmd};
use dunnage::serve::{self, ServeArgs};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dunnage", version, about = "Thin, snapshottable block volumes for Docker, served from userspace", long_about = None)]
struct Cli {
    /// Run directory of the daemon: holds control.sock (and, by default, the
    /// mount points). The CLI finds the daemon through it.
    #[arg(
        long,
        global = true,
        env = "DUNNAGE_RUN_DIR",
        default_value = "/run/dunnage"
    )]
    run_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: the Docker plugin socket and the control socket.
    /// Logs go to stderr; set RUST_LOG (e.g. debug) for more.
    Serve(Box<ServeArgs>),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Manage a volume's snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// The cluster's nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// A replicated volume's replicas: add, remove, accept one as the data when none is
    /// in sync, checksum this node's.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// This node and its cluster at a glance, and what needs attention:
    /// nodes down, volumes degraded or unavailable, a filling data
    /// directory.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Exit 1 if something needs attention (WARN), 2 on an ERROR
        /// (for monitoring scripts).
        #[arg(long)]
        check: bool,
    },
    /// Attach a volume as a block device on this host; prints the device path.
    Attach {
        /// The volume's name.
        name: String,
    },
    /// Detach a volume attached with `dunnage attach`.
    Detach {
        /// The volume's name.
        name: String,
    },
    /// Test helper: write, discard and flush an engine image in a loop,
    /// reporting each flush on stdout (see `tests/engine_crash.rs`).
    #[command(hide = true)]
    DebugEngineWriter { dir: PathBuf },
    /// Internal: the process `serve` starts to hold FUSE descriptors across
    /// a daemon restart (see src/export/fuse/keeper.rs). Not for users.
    #[command(hide = true)]
    FuseKeeper,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An import's copier sees EPIPE (the daemon stopped reading: its error
    // follows), not a silent SIGPIPE death.
    let importing = matches!(&cli.cmd, Cmd::Volume(VolumeCmd::Import { .. }));
    if !matches!(cli.cmd, Cmd::Serve(_) | Cmd::FuseKeeper) && !importing {
        dunnage::sys::signal::default_sigpipe();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,fuser=warn,actix_server=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let res = match cli.cmd {
        Cmd::Serve(args) => serve::run(*args, cli.run_dir),
        Cmd::Volume(cmd) => cli::volume(&cli.run_dir, cmd),
        Cmd::Snapshot(cmd) => cli::snapshot(&cli.run_dir, cmd),
        Cmd::Node(cmd) => cli::cluster::node(&cli.run_dir, cmd),
        Cmd::Replica(cmd) => cli::cluster::replica(&cli.run_dir, cmd),
        Cmd::Status { json, check } => cli::status::status(&cli.run_dir, json, check),
        Cmd::Attach { name } => cli::attach(&cli.run_dir, name),
        Cmd::Detach { name } => cli::detach(&cli.run_dir, name),
        Cmd::DebugEngineWriter { dir } => cli::debug::engine_writer(&dir),
        Cmd::FuseKeeper => dunnage::export::fuse::keeper::serve(&cli.run_dir).map_err(Into::into),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dunnage: {e:#}");
            ExitCode::FAILURE
        }
    }
}
