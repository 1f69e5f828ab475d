//! Hot paths of the thin engine: map lookup + read of an allocated block,
//! first-write allocation, a request split across blocks, and 1 MiB
//! sequential requests (one system call each with identity placement);
//! then the encryption layer: XTS-AES-256 alone (4 KiB and 1 MiB, per
//! core) and 4 KiB / 1 MiB IO through a `CryptEngine`.
//!
//! `cargo bench --bench engine` measures; `cargo bench --bench engine -- --test`
//! runs each once as a smoke test.

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use aes::Aes256;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dunnage::engine::crypt::{XtsAes256, MIN_ITERATIONS};
use dunnage::engine::{BlockEngine, CryptEngine, Secret, ThinImage, ThinParams};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: u32 = 32 << 10;

fn image(size: u64) -> (tempfile::TempDir, ThinImage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = ThinImage::create(
        dir.path(),
        ThinParams {
            size,
            block_size: BS,
        },
    )
    .expect("create image");
    (dir, img)
}

fn filled(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 | 1).collect()
}

fn read_allocated_4k(c: &mut Criterion) {
    let (_dir, img) = image(64 << 20);
    img.write_at(&filled(8 << 20), 0).expect("fill");
    let mut buf = vec![0u8; 4096];
    let mut i = 0u64;
    c.bench_function("read_4k_allocated", |b| {
        b.iter(|| {
            // Walk 2048 different 4k slots over 256 blocks.
            i = (i + 1) % 2048;
            img.read_at(black_box(&mut buf), i * 4096).expect("read");
        })
    });
}

fn first_write_allocation(c: &mut Criterion) {
    // Each timed write lands in a never-written block. Untimed between
    // batches, the batch's blocks are discarded and flushed, so their space
    // is reused and the data file stays small.
    const BATCH: u64 = 256;
    let (_dir, img) = image(BATCH * u64::from(BS));
    let data = filled(4096);
    c.bench_function("write_4k_first_allocation", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = (iters - done).min(BATCH);
                let start = Instant::now();
                for block in 0..n {
                    img.write_at(black_box(&data), block * u64::from(BS))
                        .expect("write");
                }
                elapsed += start.elapsed();
                img.discard(0, img.size()).expect("discard");
                img.flush().expect("flush");
                done += n;
            }
            elapsed
        })
    });
}

fn unaligned_64k_split(c: &mut Criterion) {
    let (_dir, img) = image(64 << 20);
    img.write_at(&filled(16 << 20), 0).expect("fill");
    let data = filled(64 << 10);
    let mut i = 0u64;
    c.bench_function("write_64k_unaligned_split", |b| {
        b.iter(|| {
            // 64 KiB at an odd offset: spans three 32 KiB blocks.
            i = (i + 1) % 200;
            img.write_at(black_box(&data), i * (64 << 10) + 1234)
                .expect("write");
        })
    });
}

/// 1 MiB sequential writes over a 64 MiB device: the first lap allocates,
/// later laps overwrite mapped blocks.
fn sequential_1m_write(c: &mut Criterion) {
    const MIB: u64 = 1 << 20;
    let (_dir, img) = image(64 * MIB);
    let data = filled(MIB as usize);
    let mut i = 0u64;
    let mut group = c.benchmark_group("sequential");
    group.throughput(Throughput::Bytes(MIB));
    group.bench_function("write_1m_sequential", |b| {
        b.iter(|| {
            img.write_at(black_box(&data), i * MIB).expect("write");
            i = (i + 1) % 64;
        })
    });
    group.finish();
}

/// 1 MiB sequential reads of a written 64 MiB device.
fn sequential_1m_read(c: &mut Criterion) {
    const MIB: u64 = 1 << 20;
    let (_dir, img) = image(64 * MIB);
    img.write_at(&filled(64 * MIB as usize), 0).expect("fill");
    let mut buf = vec![0u8; MIB as usize];
    let mut i = 0u64;
    let mut group = c.benchmark_group("sequential");
    group.throughput(Throughput::Bytes(MIB));
    group.bench_function("read_1m_sequential", |b| {
        b.iter(|| {
            img.read_at(black_box(&mut buf), i * MIB).expect("read");
            i = (i + 1) % 64;
        })
    });
    group.finish();
}

/// This thread's CPU time, from `/proc/thread-self/schedstat` (ns).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// `iters` runs of `f`, timed in this thread's CPU time where Linux tells
/// it (wall time otherwise): per-core cost, much less disturbed by other
/// processes on a shared machine than wall time.
fn cpu_timed(iters: u64, mut f: impl FnMut()) -> Duration {
    let (cpu, wall) = (thread_cpu(), Instant::now());
    for _ in 0..iters {
        f();
    }
    match (cpu, thread_cpu()) {
        (Some(start), Some(end)) => end.saturating_sub(start),
        _ => wall.elapsed(),
    }
}

/// XTS-AES-256 alone, in place, per core (CPU time, see [`cpu_timed`]),
/// and plain AES-256 over 1 MiB as the ceiling.
fn xts_cipher(c: &mut Criterion) {
    let xts = XtsAes256::new(&[7u8; 64]);
    let mut group = c.benchmark_group("xts");
    for (name, len) in [("4k", 4096usize), ("1m", 1 << 20)] {
        let mut buf = filled(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("encrypt_{name}"), |b| {
            b.iter_custom(|iters| cpu_timed(iters, || xts.encrypt(black_box(&mut buf), 1234)))
        });
        group.bench_function(format!("decrypt_{name}"), |b| {
            b.iter_custom(|iters| cpu_timed(iters, || xts.decrypt(black_box(&mut buf), 1234)))
        });
    }
    // The ceiling: AES-256 alone (ECB, no tweaks) over 1 MiB.
    let aes = Aes256::new_from_slice(&[3u8; 32]).expect("AES-256 key");
    let mut blocks = vec![Array([1u8; 16]); 65536];
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("aes_ecb_1m", |b| {
        b.iter_custom(|iters| cpu_timed(iters, || aes.encrypt_blocks(black_box(&mut blocks))))
    });
    group.finish();
}

/// 4 KiB random-ish and 1 MiB sequential IO through a `CryptEngine` over a
/// written 64 MiB image (overwrites: no allocation in the loop).
fn crypt_engine_io(c: &mut Criterion) {
    const MIB: u64 = 1 << 20;
    let (dir, img) = image(64 * MIB);
    let engine = CryptEngine::create_with_iterations(
        Arc::new(img),
        dir.path(),
        &Secret::new("bench"),
        MIN_ITERATIONS,
    )
    .expect("encrypt image");
    engine
        .write_at(&filled(64 * MIB as usize), 0)
        .expect("fill");
    let mut group = c.benchmark_group("crypt");
    for (name, len, slots) in [("4k", 4096u64, 2048u64), ("1m", MIB, 64)] {
        let data = filled(len as usize);
        let mut buf = vec![0u8; len as usize];
        let mut i = 0u64;
        group.throughput(Throughput::Bytes(len));
        group.bench_function(format!("write_{name}"), |b| {
            b.iter(|| {
                i = (i + 7) % slots;
                engine.write_at(black_box(&data), i * len).expect("write");
            })
        });
        group.bench_function(format!("read_{name}"), |b| {
            b.iter(|| {
                i = (i + 7) % slots;
                engine.read_at(black_box(&mut buf), i * len).expect("read");
            })
        });
    }
    group.finish();
}

/// A 64 MiB image, written whole, with one snapshot (`s`) sharing every
/// block: the next write to each block copies it (copy-on-write).
fn shared_image() -> (tempfile::TempDir, ThinImage) {
    let (dir, img) = image(64 << 20);
    img.write_at(&filled(64 << 20), 0).expect("fill");
    img.snapshot("s").expect("snapshot");
    (dir, img)
}

/// Share every block again (untimed): the copies made since become the
/// snapshot's, the blocks only the old snapshot held are freed.
fn reshare(img: &ThinImage) {
    img.delete_snapshot("s").expect("delete snapshot");
    img.snapshot("s").expect("snapshot");
}

/// Timed writes made by `write(img, i)` for `i` in a batch of `per_lap`,
/// each into a block still shared; the blocks are shared again between
/// batches, untimed.
fn cow_laps(
    img: &ThinImage,
    iters: u64,
    per_lap: u64,
    mut write: impl FnMut(&ThinImage, u64),
) -> Duration {
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(per_lap);
        let start = Instant::now();
        for i in 0..n {
            write(img, i);
        }
        elapsed += start.elapsed();
        reshare(img);
        done += n;
    }
    elapsed
}

/// 4 KiB writes, each into a different shared 32 KiB block (in a scattered
/// order, at a varying 4 KiB slot): the copy-on-write path of a random
/// small write. `TMPDIR=/dev/shm` measures it on tmpfs, as `just bench` does.
fn cow_write_4k(c: &mut Criterion) {
    let (_dir, img) = shared_image();
    let blocks = img.size() / u64::from(BS);
    let data = filled(4096);
    c.bench_function("cow_write_4k_shared_block", |b| {
        b.iter_custom(|iters| {
            cow_laps(&img, iters, blocks, |img, i| {
                // 1021 is prime, so i -> block visits every block once a lap.
                let block = (i * 1021) % blocks;
                let at = block * u64::from(BS) + (i % 8) * 4096;
                img.write_at(black_box(&data), at).expect("write");
            })
        })
    });
}

/// 32 KiB writes, each overwriting a whole shared block: nothing of the
/// old block is needed.
fn cow_write_full_block(c: &mut Criterion) {
    let (_dir, img) = shared_image();
    let blocks = img.size() / u64::from(BS);
    let data = filled(BS as usize);
    c.bench_function("cow_write_32k_whole_shared_block", |b| {
        b.iter_custom(|iters| {
            cow_laps(&img, iters, blocks, |img, i| {
                let block = (i * 1021) % blocks;
                img.write_at(black_box(&data), block * u64::from(BS))
                    .expect("write");
            })
        })
    });
}

/// 1 MiB sequential writes over shared blocks: every block of each
/// request is copied (overwritten whole).
fn cow_write_1m_sequential(c: &mut Criterion) {
    const MIB: u64 = 1 << 20;
    let (_dir, img) = shared_image();
    let data = filled(MIB as usize);
    let mut group = c.benchmark_group("sequential");
    group.throughput(Throughput::Bytes(MIB));
    group.bench_function("cow_write_1m_shared", |b| {
        b.iter_custom(|iters| {
            cow_laps(&img, iters, 64, |img, i| {
                img.write_at(black_box(&data), i * MIB).expect("write");
            })
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800))
}

criterion_group! {
    name = benches;
    config = config();
    targets = read_allocated_4k, first_write_allocation, unaligned_64k_split,
        sequential_1m_write, sequential_1m_read, xts_cipher, crypt_engine_io
}
criterion_group! {
    name = cow;
    config = config();
    targets = cow_write_4k, cow_write_full_block, cow_write_1m_sequential
}
criterion_main!(benches, cow);
