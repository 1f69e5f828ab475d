//! Hidden debugging subcommands of the binary, for tests and diagnosis; not
//! part of the operator's interface.

use crate::engine::pattern::pattern;
use crate::engine::{BlockEngine, ThinImage};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// `dunnage debug-engine-writer DIR`: the writer side of the engine's kill -9
/// test (`tests/engine_crash.rs`).
///
/// Opens the thin image in `dir` and, for each region of 8 blocks in turn,
/// writes [`pattern`]`(j, block_size)` to every block `j` of the region,
/// discards the odd blocks of the previous region, flushes, and prints
/// `flushed K` (K = region index) to stdout, flushing stdout. After the last
/// region it prints `done` and sleeps for a minute, waiting to be killed.
pub fn engine_writer(dir: &Path) -> Result<()> {
    let img = ThinImage::open(dir)?;
    let bs = u64::from(img.block_size());
    let regions = img.size() / (8 * bs);
    let mut out = std::io::stdout();
    for k in 0..regions {
        for j in k * 8..k * 8 + 8 {
            img.write_at(&pattern(j, bs as usize), j * bs)
                .with_context(|| format!("writing block {j}"))?;
        }
        if k > 0 {
            for j in ((k - 1) * 8..k * 8).filter(|j| j % 2 == 1) {
                img.discard(j * bs, bs)
                    .with_context(|| format!("discarding block {j}"))?;
            }
        }
        img.flush().context("flushing")?;
        writeln!(out, "flushed {k}")?;
        out.flush()?;
    }
    writeln!(out, "done")?;
    out.flush()?;
    std::thread::sleep(std::time::Duration::from_secs(60));
    Ok(())
}
