//! Control-plane timing: Docker's plugin calls on dunnage's socket, and
//! `docker run` with a dunnage volume against Docker's `local` driver.

use crate::job::median;
use crate::proc::{run, run_ok, stopped, Teardown};
use crate::targets::Dunnage;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Debian's client, which matches the 20.10 engine (never /usr/local/bin/docker).
pub const DOCKER: &str = "/usr/bin/docker";
pub const IMAGE: &str = "dunnage-test-busybox";
/// Where dockerd looks for legacy plugin sockets.
pub const DOCKER_PLUGIN_DIR: &str = "/run/docker/plugins";
/// The driver name of the daemon that dockerd talks to. Fixed, not per run:
/// dockerd remembers every socket driver it has used until it restarts, and a
/// remembered driver whose socket is gone costs ~30 s whenever it probes them.
pub const DOCKER_DRIVER: &str = "dunnage-bench";

/// One HTTP POST on a unix socket (`Connection: close`): status and JSON body.
pub fn plugin_post(sock: &Path, endpoint: &str, body: &str) -> Result<(u16, Value)> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(&raw)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("truncated HTTP response from {endpoint}"),
    };
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let status = resp.code.unwrap_or(0);
    let body = if chunked {
        dechunk(&raw[n..])?
    } else {
        raw[n..].to_vec()
    };
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .with_context(|| format!("{endpoint}: {}", String::from_utf8_lossy(&body)))?
    };
    Ok((status, v))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let (start, len) = match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete(x)) => x,
            _ => bail!("bad chunked encoding"),
        };
        let len = usize::try_from(len)?;
        if len == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(start..start + len)
            .context("truncated chunked body")?;
        out.extend_from_slice(chunk);
        data = data.get(start + len + 2..).unwrap_or_default();
    }
}

/// A plugin call that must answer 200 (else the `Err` it gave).
fn call(sock: &Path, endpoint: &str, body: &Value) -> Result<Value> {
    let (status, v) = plugin_post(sock, endpoint, &body.to_string())?;
    if status != 200 {
        bail!(
            "{endpoint} answered {status}: {}",
            v.get("Err").and_then(Value::as_str).unwrap_or("(no Err)")
        );
    }
    Ok(v)
}

fn mount_id() -> String {
    format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub samples_ms: Vec<f64>,
}

impl Timing {
    fn of(samples_ms: Vec<f64>) -> Timing {
        Timing {
            median_ms: median(samples_ms.clone()).unwrap_or(f64::NAN),
            samples_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PluginTiming {
    pub volume: &'static str,
    pub create: Timing,
    /// First Mount: attach, mkfs.ext4, mount.
    pub mount: Timing,
    pub unmount: Timing,
    pub remove: Timing,
    pub total: Timing,
}

/// `n` times: Create, Mount, Unmount, Remove of a 1 GiB ext4 volume through the
/// plugin socket, each call timed.
pub fn plugin_cycles(sock: &Path, n: usize, mut step: impl FnMut(usize)) -> Result<PluginTiming> {
    let mut t: [Vec<f64>; 5] = Default::default();
    for i in 0..n {
        crate::proc::check_stop()?;
        let name = format!("cp-{}-{i}", std::process::id());
        let id = mount_id();
        let vol = json!({ "Name": name });
        let with_id = json!({ "Name": name, "ID": id });
        let t0 = Instant::now();
        call(
            sock,
            "/VolumeDriver.Create",
            &json!({ "Name": name, "Opts": { "size": "1G" } }),
        )?;
        let t1 = Instant::now();
        let res = call(sock, "/VolumeDriver.Mount", &with_id).and_then(|v| {
            match v.get("Mountpoint").and_then(Value::as_str) {
                Some(m) if !m.is_empty() => Ok(()),
                _ => bail!("/VolumeDriver.Mount gave no Mountpoint: {v}"),
            }
        });
        if let Err(e) = res {
            let _ = call(sock, "/VolumeDriver.Remove", &vol);
            return Err(e);
        }
        let t2 = Instant::now();
        call(sock, "/VolumeDriver.Unmount", &with_id)?;
        let t3 = Instant::now();
        call(sock, "/VolumeDriver.Remove", &vol)?;
        let t4 = Instant::now();
        for (k, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0]
            .into_iter()
            .enumerate()
        {
            t[k].push(ms(d));
        }
        step(i);
    }
    let [c, m, u, r, total] = t;
    Ok(PluginTiming {
        volume: "1 GiB ext4",
        create: Timing::of(c),
        mount: Timing::of(m),
        unmount: Timing::of(u),
        remove: Timing::of(r),
        total: Timing::of(total),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct DockerTiming {
    pub command: String,
    pub dunnage: Timing,
    pub local: Timing,
    pub docker_version: String,
}

/// `docker run --rm -v VOL:/data IMAGE true` with an existing dunnage volume and
/// with a `local` one, `n` times each (interleaved, after one untimed run each).
/// `Ok(Err(why))` when Docker is not usable here: the row is then "not measured".
pub fn docker_runs(
    bin: &Path,
    root: &Path,
    log: &Path,
    n: usize,
    td: &mut Teardown,
    mut step: impl FnMut(&str),
) -> Result<std::result::Result<DockerTiming, String>> {
    let mark = td.mark();
    let res = docker_runs_inner(bin, root, log, n, td, &mut step);
    td.unwind_to(mark);
    match res {
        Ok(t) => Ok(Ok(t)),
        Err(e) if stopped() => Err(e),
        Err(e) => Ok(Err(format!("{e:#}"))),
    }
}

fn docker(args: &[&str], timeout: Duration) -> Result<String> {
    run_ok(Command::new(DOCKER).args(args), timeout)
}

fn docker_runs_inner(
    bin: &Path,
    root: &Path,
    log: &Path,
    n: usize,
    td: &mut Teardown,
    step: &mut dyn FnMut(&str),
) -> Result<DockerTiming> {
    if !Path::new(DOCKER).is_file() {
        bail!("{DOCKER} is missing (install docker.io: scripts/install-deps.sh)");
    }
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    step("starting dockerd (scripts/dockerd.sh)");
    run_ok(
        &mut Command::new(scripts.join("dockerd.sh")),
        Duration::from_secs(120),
    )
    .context("scripts/dockerd.sh")?;
    step("building the test image (scripts/test-image.sh)");
    run_ok(
        &mut Command::new(scripts.join("test-image.sh")),
        Duration::from_secs(300),
    )
    .context("scripts/test-image.sh")?;
    let version = docker(
        &["version", "--format", "{{.Server.Version}}"],
        Duration::from_secs(30),
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|e| format!("unknown ({e:#})"));

    step("starting a dunnage daemon for dockerd");
    let d = Dunnage::start(
        bin,
        DOCKER_DRIVER,
        &root.join("docker"),
        Path::new(DOCKER_PLUGIN_DIR),
        "fuse",
        None,
        log,
        td,
    )?;
    let pid = std::process::id();
    let dvol = format!("bench-{pid}-dunnage");
    let lvol = format!("bench-{pid}-local");
    for (vol, driver) in [(&dvol, d.name.as_str()), (&lvol, "local")] {
        let mut args = vec!["volume", "create", "-d", driver];
        if driver != "local" {
            args.extend(["--opt", "size=1G"]);
        }
        args.push(vol);
        docker(&args, Duration::from_secs(120))?;
        let v = vol.clone();
        td.push(format!("docker volume rm {vol}"), move || {
            docker(&["volume", "rm", "-f", &v], Duration::from_secs(120)).map(drop)
        });
    }
    let time_run = |vol: &str| -> Result<f64> {
        let bind = format!("{vol}:/data");
        let out = run(
            Command::new(DOCKER).args(["run", "--rm", "-v", &bind, IMAGE, "true"]),
            Duration::from_secs(120),
        )?;
        if !out.status.success() {
            bail!(
                "docker run -v {bind} {IMAGE} true failed ({}): {}",
                out.status,
                out.tail()
            );
        }
        Ok(ms(out.elapsed))
    };
    step("docker run: untimed first runs (mkfs on the dunnage volume)");
    time_run(&dvol)?;
    time_run(&lvol)?;
    let (mut dt, mut lt) = (Vec::new(), Vec::new());
    for i in 0..n {
        step(&format!("docker run {}/{n}", i + 1));
        dt.push(time_run(&dvol)?);
        lt.push(time_run(&lvol)?);
    }
    Ok(DockerTiming {
        command: format!("docker run --rm -v VOL:/data {IMAGE} true"),
        dunnage: Timing::of(dt),
        local: Timing::of(lt),
        docker_version: version,
    })
}
