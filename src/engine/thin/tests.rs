use super::*;
use crate::engine::pattern::{pattern, Rng};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Barrier};

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

pub(super) fn new_image(size: u64, block_size: u32) -> (tempfile::TempDir, ThinImage) {
    let dir = tempfile::tempdir().unwrap();
    let img = ThinImage::create(dir.path(), ThinParams { size, block_size }).unwrap();
    (dir, img)
}

pub(super) fn read_vec(img: &ThinImage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    img.read_at(&mut buf, offset).unwrap();
    buf
}

pub(super) fn map_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(MAP_FILE)).unwrap()
}

impl ThinImage {
    /// A machine crash after the data reached the disk but the map
    /// pages written through since the last flush did not: kill -9,
    /// then the map file as that flush left it (`flushed`).
    pub(super) fn power_cut(self, dir: &Path, flushed: &[u8]) {
        self.crash();
        std::fs::write(dir.join(MAP_FILE), flushed).unwrap();
        // The machine restarted: a copy journal is from another boot.
        if copies::testing::records(dir) > 0 {
            copies::testing::from_another_boot(dir);
        }
    }
}

pub(super) fn data_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(DATA_FILE)).unwrap().len()
}

pub(super) fn data_disk_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(DATA_FILE)).unwrap().blocks() * 512
}

fn dir_disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// Random unaligned writes, reads and discards against an in-memory model.
fn model_check(size: u64, block_size: u32, seed: u64) {
    let (dir, img) = new_image(size, block_size);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    let max_len = (3 * block_size as u64 + 1000).min(160 * KIB);
    for op in 0..600u64 {
        let offset = rng.below(size);
        let len = rng.below(max_len.min(size - offset) + 1) as usize;
        let o = offset as usize;
        match rng.below(10) {
            0..=4 => {
                let data = if rng.below(8) == 0 {
                    vec![0u8; len]
                } else {
                    pattern(op, len)
                };
                img.write_at(&data, offset).unwrap();
                model[o..o + len].copy_from_slice(&data);
            }
            5..=7 => {
                assert_eq!(read_vec(&img, offset, len), &model[o..o + len], "op {op}");
            }
            8 => {
                img.discard(offset, len as u64).unwrap();
                model[o..o + len].fill(0);
            }
            _ => img.flush().unwrap(),
        }
    }
    assert_eq!(read_vec(&img, 0, size as usize), model);
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, size as usize), model);
}

#[test]
fn round_trip_aligned() {
    let (_dir, img) = new_image(4 * MIB, 8 << 10);
    for block in [0u64, 1, 7, 511] {
        let data = pattern(block, 8 << 10);
        img.write_at(&data, block * (8 << 10)).unwrap();
        assert_eq!(read_vec(&img, block * (8 << 10), 8 << 10), data);
    }
    let big = pattern(99, 64 << 10);
    img.write_at(&big, MIB).unwrap();
    assert_eq!(read_vec(&img, MIB, 64 << 10), big);
    assert_eq!(img.usage().allocated_blocks, 4 + 8);
}

#[test]
fn round_trip_unaligned_random() {
    model_check(MIB, 4096, 1);
    // Partial last block: 1 MiB + 12 KiB with 16 KiB blocks.
    model_check(MIB + 12 * KIB, 16 << 10, 2);
    model_check(3 * MIB, 1 << 20, 3);
}

#[test]
fn holes_read_zero() {
    let (_dir, img) = new_image(8 * MIB, 32 << 10);
    assert!(read_vec(&img, 0, 8 * MIB as usize).iter().all(|&b| b == 0));
    // A partial write into a fresh block: the rest of it reads zeros.
    let data = pattern(5, 1000);
    img.write_at(&data, 3 * MIB + 5000).unwrap();
    let block = read_vec(&img, 3 * MIB, 32 << 10);
    assert_eq!(&block[5000..6000], &data[..]);
    assert!(block[..5000].iter().all(|&b| b == 0));
    assert!(block[6000..].iter().all(|&b| b == 0));
    // Neighbouring blocks stay holes.
    assert!(read_vec(&img, 3 * MIB - 100, 100).iter().all(|&b| b == 0));
    assert!(read_vec(&img, 3 * MIB + (32 << 10), 100)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(img.usage().allocated_blocks, 1);
}

#[test]
fn zero_writes_do_not_allocate() {
    let (dir, img) = new_image(16 * MIB, 4096);
    img.write_at(&vec![0u8; 4 * MIB as usize], 1000).unwrap();
    img.flush().unwrap();
    assert_eq!(img.usage().allocated_blocks, 0);
    assert_eq!(data_len(dir.path()), 0);
    // Zeros over an allocated block do overwrite it (and it stays allocated).
    img.write_at(&pattern(1, 8192), 0).unwrap();
    img.write_at(&[0u8; 100], 4000).unwrap();
    let back = read_vec(&img, 0, 8192);
    assert!(back[4000..4100].iter().all(|&b| b == 0));
    assert_eq!(back[..4000], pattern(1, 8192)[..4000]);
    assert_eq!(img.usage().allocated_blocks, 2);
    // A write mixing zero and non-zero blocks allocates only the latter.
    let mut mixed = vec![0u8; 3 * 4096];
    mixed[4096..8192].copy_from_slice(&pattern(2, 4096));
    img.write_at(&mixed, 64 * 4096).unwrap();
    assert_eq!(img.usage().allocated_blocks, 3);
    assert_eq!(read_vec(&img, 64 * 4096, 3 * 4096), mixed);
}

#[test]
fn discard_unmaps_punches_and_space_is_reused() {
    let bs = 64 * KIB;
    let (dir, mut img) = new_image(4 * MIB, bs as u32);
    // The fallback placement (images of earlier builds): identity
    // placement never reuses a block for another logical block; see
    // `identity_discard_punches_and_revives` for it.
    img.set_identity_placement(false);
    let data = pattern(7, 8 * bs as usize);
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    assert_eq!(img.usage().allocated_blocks, 8);
    let disk_before = data_disk_bytes(dir.path());
    assert!(disk_before >= 8 * bs, "{disk_before}");

    // Half of block 0, blocks 1..=4 whole, 100 bytes of block 5.
    let (start, end) = (bs / 2, 5 * bs + 100);
    img.discard(start, end - start).unwrap();
    assert_eq!(img.usage().allocated_blocks, 4);
    let mut expect = data.clone();
    expect[start as usize..end as usize].fill(0);
    assert_eq!(read_vec(&img, 0, 8 * bs as usize), expect);
    let disk_after = data_disk_bytes(dir.path());
    assert!(
        disk_before - disk_after >= 4 * bs,
        "{disk_before} -> {disk_after}"
    );

    // Freed blocks are not reused before the flush that unmaps them...
    img.write_at(&pattern(8, bs as usize), 20 * bs).unwrap();
    assert_eq!(data_len(dir.path()), 9 * bs);
    img.flush().unwrap();
    // ...and are reused after it: the data file does not grow.
    for (i, block) in (30..34u64).enumerate() {
        img.write_at(&pattern(100 + i as u64, 1000), block * bs + 10)
            .unwrap();
    }
    assert_eq!(data_len(dir.path()), 9 * bs);
    assert_eq!(img.usage().allocated_blocks, 9);
    for (i, block) in (30..34u64).enumerate() {
        let got = read_vec(&img, block * bs, bs as usize);
        assert!(got[..10].iter().all(|&b| b == 0));
        assert_eq!(got[10..1010], pattern(100 + i as u64, 1000)[..]);
        assert!(
            got[1010..].iter().all(|&b| b == 0),
            "reused block {block} not zero"
        );
    }
}

#[test]
fn discard_to_end_frees_partial_last_block() {
    // 3 blocks of 8 KiB, the last one 4 KiB long.
    let (_dir, img) = new_image(20 * KIB, 8 << 10);
    img.write_at(&pattern(1, 20 * KIB as usize), 0).unwrap();
    assert_eq!(img.usage().allocated_blocks, 3);
    img.discard(16 * KIB, 4 * KIB).unwrap();
    assert_eq!(img.usage().allocated_blocks, 2);
    assert!(read_vec(&img, 16 * KIB, 4096).iter().all(|&b| b == 0));
    // A discard inside one block only zeroes.
    img.discard(100, 200).unwrap();
    assert_eq!(img.usage().allocated_blocks, 2);
    let back = read_vec(&img, 0, 8192);
    assert!(back[100..300].iter().all(|&b| b == 0));
    assert_eq!(back[300..], pattern(1, 8192)[300..]);
    // Discarding everything frees everything.
    img.discard(0, 20 * KIB).unwrap();
    assert_eq!(img.usage().allocated_blocks, 0);
}

#[test]
fn concurrent_first_writes_allocate_once() {
    const THREADS: usize = 4;
    const BLOCKS: u64 = 64;
    let (_dir, img) = new_image(BLOCKS * 4096, 4096);
    let img = Arc::new(img);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (img, barrier) = (img.clone(), barrier.clone());
            std::thread::spawn(move || {
                let data = pattern(t as u64 + 1, 4096);
                for block in 0..BLOCKS {
                    barrier.wait();
                    img.write_at(&data, block * 4096).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(img.usage().allocated_blocks, BLOCKS);
    let candidates: Vec<Vec<u8>> = (0..THREADS).map(|t| pattern(t as u64 + 1, 4096)).collect();
    for block in 0..BLOCKS {
        let got = read_vec(&img, block * 4096, 4096);
        assert!(
            candidates.contains(&got),
            "block {block} is not one writer's data"
        );
    }
    drop(img);
}

#[test]
fn concurrent_partial_first_writes_all_land() {
    const THREADS: usize = 4;
    const BLOCKS: u64 = 32;
    let bs = 16 * KIB;
    let (_dir, img) = new_image(BLOCKS * bs, bs as u32);
    let img = Arc::new(img);
    let barrier = Arc::new(Barrier::new(THREADS));
    let quarter = (bs / 4) as usize;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (img, barrier) = (img.clone(), barrier.clone());
            std::thread::spawn(move || {
                for block in 0..BLOCKS {
                    barrier.wait();
                    let data = pattern(block * 10 + t as u64, quarter);
                    img.write_at(&data, block * bs + (t * quarter) as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(img.usage().allocated_blocks, BLOCKS);
    for block in 0..BLOCKS {
        let got = read_vec(&img, block * bs, bs as usize);
        for t in 0..THREADS {
            let part = &got[t * quarter..(t + 1) * quarter];
            assert_eq!(
                part,
                pattern(block * 10 + t as u64, quarter),
                "block {block} part {t}"
            );
        }
    }
}

/// One thread's random mix of writes, reads (checked against a model),
/// discards and flushes on its own region `t`; returns what the region
/// must hold.
fn model_thread(
    img: &ThinImage,
    t: u64,
    region: u64,
    seed: u64,
    ops: u64,
    max_len: u64,
) -> Vec<u8> {
    let base = t * region;
    let mut model = vec![0u8; region as usize];
    let mut rng = Rng(seed);
    for op in 0..ops {
        let off = rng.below(region);
        let len = rng.below(max_len.min(region - off) + 1) as usize;
        let o = off as usize;
        match rng.below(12) {
            0..=5 => {
                let data = pattern(t << 32 | op, len);
                img.write_at(&data, base + off).unwrap();
                model[o..o + len].copy_from_slice(&data);
            }
            6..=8 => {
                let mut buf = vec![0u8; len];
                img.read_at(&mut buf, base + off).unwrap();
                assert_eq!(buf, &model[o..o + len], "thread {t} op {op}");
            }
            9 | 10 => {
                img.discard(base + off, len as u64).unwrap();
                model[o..o + len].fill(0);
            }
            _ => img.flush().unwrap(),
        }
    }
    model
}

#[test]
fn concurrent_mixed_io_matches_model() {
    const THREADS: u64 = 4;
    let bs = 4096u64;
    let region = 96 * bs + 1234; // regions straddle blocks
    let size = (THREADS * region).div_ceil(4096) * 4096;
    let (dir, img) = new_image(size, bs as u32);
    let img = Arc::new(img);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || model_thread(&img, t, region, t + 11, 1500, 3 * bs))
        })
        .collect();
    let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let img = Arc::into_inner(img).unwrap();
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    for (t, model) in models.iter().enumerate() {
        assert_eq!(
            &read_vec(&img, t as u64 * region, region as usize),
            model,
            "thread {t}"
        );
    }
}

#[test]
fn reopen_after_drop_keeps_data() {
    let (dir, img) = new_image(64 * MIB, 32 << 10);
    let a = pattern(1, 100_000);
    img.write_at(&a, 12_345).unwrap();
    img.write_at(&pattern(2, 4096), 40 * MIB).unwrap();
    img.discard(40 * MIB, 32 << 10).unwrap();
    let usage = img.usage();
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 12_345, a.len()), a);
    assert!(read_vec(&img, 40 * MIB, 4096).iter().all(|&b| b == 0));
    assert_eq!(img.usage().allocated_blocks, usage.allocated_blocks);
    assert_eq!(img.size(), 64 * MIB);
    assert_eq!(img.block_size(), 32 << 10);
}

#[test]
fn crash_keeps_flushed_writes() {
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    for block in 0..10 {
        img.write_at(&pattern(block, 4096), block * bs).unwrap();
    }
    img.flush().unwrap();
    let flushed = map_bytes(dir.path());
    // Not flushed: a discard, an overwrite, new allocations.
    img.discard(3 * bs, bs).unwrap();
    img.write_at(&pattern(1000, 4096), 4 * bs).unwrap();
    for block in 10..20 {
        img.write_at(&pattern(block, 4096), block * bs).unwrap();
    }
    img.power_cut(dir.path(), &flushed);

    let img = ThinImage::open(dir.path()).unwrap();
    for block in 0..10 {
        let got = read_vec(&img, block * bs, 4096);
        match block {
            3 => assert!(got == pattern(3, 4096) || got.iter().all(|&b| b == 0)),
            4 => assert!(got == pattern(4, 4096) || got == pattern(1000, 4096)),
            _ => assert_eq!(got, pattern(block, 4096), "flushed block {block} lost"),
        }
    }
    for block in 10..20 {
        let got = read_vec(&img, block * bs, 4096);
        assert!(got == pattern(block, 4096) || got.iter().all(|&b| b == 0));
    }
    // Blocks written but never durably mapped were cut off...
    assert!(data_len(dir.path()) <= 10 * bs);
    // ...so fresh allocations read zeros around what is written.
    for block in 40..60u64 {
        img.write_at(&[0xEE; 10], block * bs + 2000).unwrap();
        let got = read_vec(&img, block * bs, 4096);
        assert!(got[..2000].iter().all(|&b| b == 0), "block {block}");
        assert!(got[2010..].iter().all(|&b| b == 0), "block {block}");
    }
}

#[test]
fn kill9_keeps_every_completed_write_and_discard() {
    // A killed process under a live device: the kernel was told these
    // are done, and the next daemon serves the same device.
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    for block in 0..10 {
        img.write_at(&pattern(block, 4096), block * bs).unwrap();
    }
    img.flush().unwrap();
    img.discard(3 * bs, bs).unwrap();
    for block in 10..20 {
        img.write_at(&pattern(block, 4096), block * bs).unwrap();
    }
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    for block in (0..20).filter(|&b| b != 3) {
        assert_eq!(
            read_vec(&img, block * bs, 4096),
            pattern(block, 4096),
            "block {block}"
        );
    }
    assert!(read_vec(&img, 3 * bs, 4096).iter().all(|&b| b == 0));
    assert_eq!(img.usage().allocated_blocks, 19);
}

#[test]
fn crash_then_reuse_reads_zeros() {
    let bs = 4096u64;
    let (dir, mut img) = new_image(MIB, bs as u32);
    // The fallback placement (images of earlier builds), which reuses a
    // block for another logical block; `identity_crash_then_rewrite_reads_zeros`
    // is the identity placement's case.
    img.set_identity_placement(false);
    for block in 0..10 {
        img.write_at(&pattern(block, 4096), block * bs).unwrap();
    }
    img.discard(3 * bs, bs).unwrap();
    img.flush().unwrap();
    let flushed = map_bytes(dir.path());
    // Reuses physical block 3; the mapping is lost in the crash but the
    // data reaches the disk.
    img.write_at(&pattern(77, 4096), 50 * bs).unwrap();
    img.power_cut(dir.path(), &flushed);

    let mut img = ThinImage::open(dir.path()).unwrap();
    img.set_identity_placement(false);
    assert!(read_vec(&img, 50 * bs, 4096).iter().all(|&b| b == 0));
    assert_eq!(img.usage().allocated_blocks, 9);
    // The next allocation reuses that physical block: it must read zeros.
    img.write_at(&[0x55; 16], 60 * bs).unwrap();
    let got = read_vec(&img, 60 * bs, 4096);
    assert_eq!(got[..16], [0x55; 16]);
    assert!(
        got[16..].iter().all(|&b| b == 0),
        "stale data exposed after crash"
    );
    assert_eq!(
        data_len(dir.path()),
        10 * bs,
        "physical block was not reused"
    );
}

#[test]
fn thin_10g_image_with_5m_written_is_small() {
    let size = 10 * GIB;
    let (dir, img) = new_image(size, 32 << 10);
    let chunk = pattern(3, MIB as usize);
    for offset in [0, 3 * GIB, 5 * GIB + 12_345, 9 * GIB, size - MIB] {
        img.write_at(&chunk, offset).unwrap();
    }
    img.flush().unwrap();
    let usage = img.usage();
    assert!(usage.allocated_bytes >= 5 * MIB && usage.allocated_bytes <= 5 * MIB + (64 << 10));
    let on_disk = dir_disk_bytes(dir.path());
    assert!(on_disk >= 5 * MIB, "data not on disk? {on_disk}");
    assert!(on_disk < 16 * MIB, "image takes {on_disk} bytes on disk");
    assert_eq!(read_vec(&img, 5 * GIB + 12_345, MIB as usize), chunk);
}

#[test]
fn create_rejects_invalid_params() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        (GIB, 3000, "block_size"),
        (GIB, 2048, "block_size"),
        (GIB, 2 << 20, "block_size"),
        (GIB, 0, "block_size"),
        (0, 4096, "size must not be 0"),
        (GIB + 512, 4096, "multiple of 4096"),
        (MAX_SIZE + 4096, 4096, "maximum"),
    ];
    for (size, block_size, needle) in bad {
        match ThinImage::create(dir.path(), ThinParams { size, block_size }) {
            Err(EngineError::InvalidParams(msg)) => {
                assert!(msg.contains(needle), "{size}/{block_size}: {msg}")
            }
            other => panic!("{size}/{block_size} accepted: {other:?}"),
        }
    }
    // Nothing was written for the refused images.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Limits themselves are fine, and size need not be a block multiple.
    let img = ThinImage::create(
        dir.path(),
        ThinParams {
            size: MAX_SIZE,
            block_size: 1 << 20,
        },
    )
    .unwrap();
    assert_eq!(img.size(), MAX_SIZE);
    // Creating over an existing image is refused.
    drop(img);
    assert!(ThinImage::create(
        dir.path(),
        ThinParams {
            size: GIB,
            block_size: 4096
        }
    )
    .is_err());
}

#[test]
fn open_rejects_damaged_or_foreign_images() {
    let (dir, img) = new_image(MIB, 4096);
    img.write_at(&pattern(1, 8192), 0).unwrap();
    drop(img);
    let hdr = dir.path().join(HEADER_FILE);
    let good = std::fs::read(&hdr).unwrap();
    let expect_corrupt = |what: &str, want_path: &Path| match ThinImage::open(dir.path()) {
        Err(EngineError::Corrupt { path, reason }) => {
            assert_eq!(path, want_path, "{what}: {reason}")
        }
        other => panic!("{what}: opened: {other:?}"),
    };

    let mut flipped = good.clone();
    flipped[17] ^= 1; // size
    std::fs::write(&hdr, &flipped).unwrap();
    expect_corrupt("flipped size bit", &hdr);
    std::fs::write(&hdr, b"#!/bin/sh\necho not an image\n").unwrap();
    expect_corrupt("foreign header", &hdr);
    std::fs::write(&hdr, &good).unwrap();

    // A map entry with unknown flags, and a physical block mapped twice.
    let map_path = dir.path().join(MAP_FILE);
    let map = File::options().write(true).open(&map_path).unwrap();
    map.write_all_at(&(1u64 | 1 << 60).to_le_bytes(), 0)
        .unwrap();
    expect_corrupt("flagged entry", &map_path);
    map.write_all_at(&2u64.to_le_bytes(), 0).unwrap(); // block 0 → phys 1, like block 1
    expect_corrupt("doubly mapped", &map_path);
    map.set_len(100).unwrap();
    expect_corrupt("short map", &map_path);

    std::fs::remove_file(&hdr).unwrap();
    match ThinImage::open(dir.path()) {
        Err(EngineError::Io { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::NotFound)
        }
        other => panic!("missing header: {other:?}"),
    }
}

#[test]
fn second_open_is_refused_while_open() {
    let (dir, img) = new_image(MIB, 4096);
    match ThinImage::open(dir.path()) {
        Err(EngineError::Io { op, .. }) => assert!(op.starts_with("lock"), "{op}"),
        other => panic!("opened twice: {other:?}"),
    }
    drop(img);
    ThinImage::open(dir.path()).unwrap();
}

#[test]
fn out_of_range_io_is_refused() {
    let (_dir, img) = new_image(MIB, 4096);
    let mut buf = [0u8; 20];
    let oor = |r: Result<(), EngineError>| matches!(r, Err(EngineError::OutOfRange { .. }));
    assert!(oor(img.read_at(&mut buf, MIB - 10)));
    assert!(oor(img.write_at(&buf, MIB - 10)));
    assert!(oor(img.discard(MIB - 10, 20)));
    assert!(oor(img.read_at(&mut buf, u64::MAX - 5)));
    assert!(oor(img.discard(u64::MAX, 2)));
    assert!(img.read_at(&mut buf, MIB - 20).is_ok());
    assert!(img.read_at(&mut [], MIB).is_ok());
    assert_eq!(img.usage().allocated_blocks, 0);
    assert_eq!(
        EngineError::OutOfRange {
            offset: 0,
            len: 0,
            size: 0
        }
        .errno(),
        libc::EINVAL
    );
}

pub(super) fn data_file_bytes(dir: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = File::open(dir.join(DATA_FILE)).unwrap();
    let mut buf = vec![0xAA; len];
    let n = read_full(&file, &mut buf, offset).unwrap();
    buf[n..].fill(0);
    buf
}

pub(super) fn marker_exists(dir: &Path) -> bool {
    dir.join(PASSTHROUGH_FILE).exists()
}

/// Syncs of the data file by flushes so far.
pub(super) fn data_syncs(img: &ThinImage) -> u64 {
    img.counters.data_syncs.load(Ordering::Relaxed)
}

/// (preads, pwrites, zero fills) so far.
pub(super) fn io_counts(img: &ThinImage) -> (u64, u64, u64) {
    let c = &img.counters;
    (
        c.preads.load(Ordering::Relaxed),
        c.pwrites.load(Ordering::Relaxed),
        c.zero_fills.load(Ordering::Relaxed),
    )
}

#[test]
fn identity_placement_makes_the_data_file_a_raw_image() {
    let size = 8 * MIB;
    let (dir, img) = new_image(size, 32 << 10);
    let writes = [
        (3 * MIB + 5000, pattern(1, 1000)),
        (0, pattern(2, 70_000)),
        (size - 4096, pattern(3, 4096)),
        (5 * MIB - 100, pattern(4, 200_000)),
    ];
    for (offset, data) in &writes {
        img.write_at(data, *offset).unwrap();
    }
    img.flush().unwrap();
    assert!(img.is_identity());
    for (offset, data) in &writes {
        assert_eq!(
            &data_file_bytes(dir.path(), *offset, data.len()),
            data,
            "data file at {offset}"
        );
    }
    // Byte for byte, the whole device.
    assert_eq!(
        data_file_bytes(dir.path(), 0, size as usize),
        read_vec(&img, 0, size as usize)
    );
    assert!(data_len(dir.path()) <= size);
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert!(img.is_identity());
    for (offset, data) in &writes {
        assert_eq!(&read_vec(&img, *offset, data.len()), data);
    }
}

#[test]
fn identity_discard_punches_and_revives() {
    let bs = 64 * KIB;
    let (dir, img) = new_image(4 * MIB, bs as u32);
    let data = pattern(7, 8 * bs as usize);
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    let disk_before = data_disk_bytes(dir.path());
    // Blocks 1..=4 whole, parts of 0 and 5.
    let (start, end) = (bs / 2, 5 * bs + 100);
    img.discard(start, end - start).unwrap();
    assert_eq!(img.usage().allocated_blocks, 4);
    let disk_after = data_disk_bytes(dir.path());
    assert!(
        disk_before - disk_after >= 4 * bs,
        "{disk_before} -> {disk_after}"
    );
    for phys in 1..=4 {
        assert!(
            img.alloc.is_used(phys),
            "deferred block {phys} free before the flush"
        );
    }
    // Block 2 written again before the flush: it gets its own block back.
    let again = pattern(8, 1000);
    img.write_at(&again, 2 * bs + 300).unwrap();
    assert_eq!(img.map.get(2).phys(), Some(2));
    assert!(img.is_identity());
    img.flush().unwrap();
    // The flush released 1, 3, 4, not the revived 2.
    assert!(img.alloc.is_used(2));
    assert!(!img.alloc.is_used(1) && !img.alloc.is_used(3) && !img.alloc.is_used(4));
    let mut expect = data.clone();
    expect[start as usize..end as usize].fill(0);
    expect[2 * bs as usize + 300..][..1000].copy_from_slice(&again);
    assert_eq!(read_vec(&img, 0, 8 * bs as usize), expect);
    // The revived block was punched: only the new write is in it.
    assert_eq!(
        data_file_bytes(dir.path(), 2 * bs, bs as usize),
        expect[2 * bs as usize..3 * bs as usize]
    );
    // Released blocks go back to their own logical blocks.
    img.write_at(&pattern(9, 10), 3 * bs + 5).unwrap();
    assert_eq!(img.map.get(3).phys(), Some(3));
    img.discard(0, 4 * MIB).unwrap();
    img.flush().unwrap();
    assert_eq!(img.usage().allocated_blocks, 0);
    assert!(img.is_identity());
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert!(read_vec(&img, 0, 4 * MIB as usize).iter().all(|&b| b == 0));
}

#[test]
fn revived_block_survives_a_crash_either_way() {
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    img.write_at(&pattern(1, 4096), 5 * bs).unwrap();
    img.flush().unwrap();
    img.discard(5 * bs, bs).unwrap();
    img.write_at(&[0x77; 100], 5 * bs + 1000).unwrap();
    assert_eq!(img.map.get(5).phys(), Some(5));
    img.crash();
    // The on-disk map still maps 5 to 5 (the discard was not flushed):
    // it reads the punch and the new write, nothing of another block.
    let img = ThinImage::open(dir.path()).unwrap();
    let got = read_vec(&img, 5 * bs, 4096);
    let mut want = vec![0u8; 4096];
    want[1000..1100].fill(0x77);
    assert_eq!(got, want);
    assert!(img.is_identity());
}

#[test]
fn identity_crash_then_rewrite_reads_zeros() {
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    for block in (0..10).chain([20]) {
        img.write_at(&pattern(block, 4096), block * bs).unwrap();
    }
    img.flush().unwrap();
    let flushed = map_bytes(dir.path());
    // Below the high-water mark, written, never durably mapped.
    img.write_at(&pattern(77, 4096), 15 * bs).unwrap();
    img.power_cut(dir.path(), &flushed);

    let img = ThinImage::open(dir.path()).unwrap();
    assert!(read_vec(&img, 15 * bs, 4096).iter().all(|&b| b == 0));
    assert_eq!(img.usage().allocated_blocks, 11);
    assert_eq!(data_len(dir.path()), 21 * bs);
    // Open punched it: a partial write reads zeros around it.
    img.write_at(&[0x55; 16], 15 * bs + 100).unwrap();
    let got = read_vec(&img, 15 * bs, 4096);
    assert_eq!(got[100..116], [0x55; 16]);
    assert!(got[..100].iter().all(|&b| b == 0));
    assert!(
        got[116..].iter().all(|&b| b == 0),
        "stale data exposed after crash"
    );
    assert_eq!(img.map.get(15).phys(), Some(15));
}

#[test]
fn a_block_freed_by_another_logical_block_is_not_revived() {
    let bs = 4096u64;
    let (dir, mut img) = new_image(MIB, bs as u32);
    // An image of an earlier build: logical 7 on physical 0.
    img.set_identity_placement(false);
    img.write_at(&pattern(7, 4096), 7 * bs).unwrap();
    img.flush().unwrap();
    assert_eq!(img.map.get(7).phys(), Some(0));
    assert!(!img.is_identity());
    img.set_identity_placement(true);
    img.discard(7 * bs, bs).unwrap();
    assert!(img.is_identity());
    // Physical 0 is deferred, freed by logical 7: logical 0 must not
    // take it before the flush (the on-disk map still maps 7 to it).
    img.write_at(&pattern(0, 4096), 0).unwrap();
    assert_ne!(img.map.get(0).phys(), Some(0));
    assert!(!img.is_identity());
    assert_eq!(img.begin_passthrough().unwrap().map(|_| ()), None);
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    // Logical 7 (its discard undone) reads its punched block or its
    // own data, never logical 0's.
    let got = read_vec(&img, 7 * bs, 4096);
    assert!(got != pattern(0, 4096), "logical 7 reads logical 0's data");
    assert!(got == pattern(7, 4096) || got.iter().all(|&b| b == 0));
    assert_eq!(read_vec(&img, 0, 4096).len(), 4096);
}

#[test]
fn contiguous_runs_are_one_syscall() {
    for bs in [4096u32, 32 << 10] {
        let (_dir, img) = new_image(8 * MIB, bs);
        let one_mib = pattern(u64::from(bs), MIB as usize);
        // A 1 MiB aligned first write on an identity volume: one pwrite.
        let before = io_counts(&img);
        img.write_at(&one_mib, MIB).unwrap();
        let after = io_counts(&img);
        assert_eq!(after.1 - before.1, 1, "bs {bs}: first write");
        // An overwrite, a read of it: one each.
        img.write_at(&one_mib, MIB).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        img.read_at(&mut buf, MIB).unwrap();
        assert_eq!(buf, one_mib);
        let now = io_counts(&img);
        assert_eq!((now.0 - after.0, now.1 - after.1), (1, 1), "bs {bs}");
        // Unaligned, straddling mapped and fresh blocks: still one.
        img.write_at(&one_mib, 2 * MIB - 12_345).unwrap();
        assert_eq!(io_counts(&img).1 - now.1, 1, "bs {bs}: unaligned");
        // Hole, data, hole: one fill, one pread, one fill.
        let before = io_counts(&img);
        let got = read_vec(&img, 0, 4 * MIB as usize);
        let after = io_counts(&img);
        assert_eq!(
            (after.0 - before.0, after.2 - before.2),
            (1, 2),
            "bs {bs}: mixed read"
        );
        let (m, tail) = (MIB as usize, 3 * MIB as usize - 12_345);
        assert!(got[..m].iter().all(|&b| b == 0));
        assert!(got[m..2 * m - 12_345] == one_mib[..m - 12_345]);
        assert!(got[2 * m - 12_345..tail] == one_mib[..]);
        assert!(got[tail..].iter().all(|&b| b == 0));
        // A zero block in the middle of a fresh write is skipped: two runs.
        let mut holed = pattern(5, 4 * bs as usize);
        holed[bs as usize..2 * bs as usize].fill(0);
        let before = io_counts(&img);
        img.write_at(&holed, 6 * MIB).unwrap();
        assert_eq!(io_counts(&img).1 - before.1, 2, "bs {bs}: zero block");
        assert_eq!(
            img.usage().allocated_blocks,
            (3 * MIB - 12_345).div_ceil(u64::from(bs)) - MIB / u64::from(bs) + 3
        );
        assert_eq!(read_vec(&img, 6 * MIB, holed.len()), holed);
    }
}

#[test]
fn passthrough_writes_through_the_file_are_kept() {
    let bs = 32u64 << 10;
    let size = 16 * MIB;
    let (dir, img) = new_image(size, bs as u32);
    img.write_at(&pattern(1, 100_000), 10_000).unwrap();
    let file = img.begin_passthrough().unwrap().expect("identity image");
    assert!(img.is_passthrough() && marker_exists(dir.path()));
    // A raw image of the device.
    assert_eq!(file.metadata().unwrap().len(), size);
    let writes = [
        (5 * MIB + 123, pattern(2, 3000)),
        (50_000, pattern(3, 10_000)), // over the engine's write
        (size - 5000, pattern(4, 5000)),
    ];
    for (offset, data) in &writes {
        file.write_all_at(data, *offset).unwrap();
    }
    let mut model = vec![0u8; size as usize];
    model[10_000..110_000].copy_from_slice(&pattern(1, 100_000));
    for (offset, data) in &writes {
        model[*offset as usize..][..data.len()].copy_from_slice(data);
    }
    // The engine's own IO goes to the same bytes.
    assert!(read_vec(&img, 0, size as usize) == model);
    img.write_at(&pattern(5, 7000), 9 * MIB).unwrap();
    model[9 * MIB as usize..][..7000].copy_from_slice(&pattern(5, 7000));
    let mut back = vec![0u8; 7000];
    file.read_exact_at(&mut back, 9 * MIB).unwrap();
    assert_eq!(back, pattern(5, 7000));
    // Usage follows the data file's allocation.
    let before = img.usage().allocated_blocks;
    assert!(before >= 4, "{before}");
    file.write_all_at(&pattern(6, 2 * MIB as usize), 12 * MIB)
        .unwrap();
    model[12 * MIB as usize..][..2 * MIB as usize].copy_from_slice(&pattern(6, 2 * MIB as usize));
    let after = img.usage().allocated_blocks;
    assert!(after >= before + 64, "{before} -> {after}");
    img.flush().unwrap();
    // Again: another handle on the same file.
    assert!(img.begin_passthrough().unwrap().is_some());
    drop(file);
    img.end_passthrough().unwrap();
    assert!(!img.is_passthrough() && !marker_exists(dir.path()));
    assert!(img.is_identity());
    assert!(read_vec(&img, 0, size as usize) == model);
    let allocated = img.usage().allocated_blocks;
    // 10_000..110_000 (4 blocks), 5 MiB+123 (1), end (1), 9 MiB (1),
    // 12 MiB (64).
    assert_eq!(allocated, 71);
    img.end_passthrough().unwrap(); // not in passthrough: nothing
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert!(read_vec(&img, 0, size as usize) == model);
    assert_eq!(img.usage().allocated_blocks, allocated);
    assert!(img.is_identity());
}

#[test]
fn crash_in_passthrough_adopts_the_writes() {
    let bs = 4096u64;
    let size = 4 * MIB;
    let (dir, img) = new_image(size, bs as u32);
    img.write_at(&pattern(1, 3 * bs as usize), 0).unwrap();
    img.flush().unwrap();
    let file = img.begin_passthrough().unwrap().unwrap();
    // Never-mapped blocks, an overwrite, and a write straddling blocks.
    file.write_all_at(&pattern(2, 4096), 100 * bs).unwrap();
    file.write_all_at(&pattern(3, 10), bs + 7).unwrap();
    file.write_all_at(&pattern(4, 9000), 200 * bs - 20).unwrap();
    file.sync_all().unwrap();
    drop(file);
    img.crash();
    assert!(marker_exists(dir.path()));

    let img = ThinImage::open(dir.path()).unwrap();
    assert!(!marker_exists(dir.path()));
    assert!(!img.is_passthrough() && img.is_identity());
    assert_eq!(read_vec(&img, 100 * bs, 4096), pattern(2, 4096));
    assert_eq!(read_vec(&img, bs + 7, 10), pattern(3, 10));
    assert_eq!(read_vec(&img, 200 * bs - 20, 9000), pattern(4, 9000));
    assert_eq!(read_vec(&img, 0, 7), pattern(1, 7));
    // 0..3, 100, 199..=202.
    assert_eq!(img.usage().allocated_blocks, 3 + 1 + 4);
    // The adoption is durable: another crash keeps it.
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 200 * bs - 20, 9000), pattern(4, 9000));
    assert_eq!(img.usage().allocated_blocks, 8);
}

#[test]
fn resuming_in_passthrough_keeps_the_kernels_writes_and_its_file() {
    let bs = 4096u64;
    let (dir, img) = new_image(4 * MIB, bs as u32);
    let file = img.begin_passthrough().unwrap().unwrap();
    file.write_all_at(&pattern(5, 4096), 10 * bs).unwrap();
    img.crash();
    // The kernel still holds the file and writes on while no daemon runs.
    file.write_all_at(&pattern(6, 4096), 20 * bs).unwrap();

    let img = ThinImage::open_resuming(dir.path()).unwrap();
    assert!(img.is_passthrough() && marker_exists(dir.path()));
    // Not cut, not scrubbed: a write made after the resume survives too.
    file.write_all_at(&pattern(7, 4096), 30 * bs).unwrap();
    for (block, seed) in [(10, 5), (20, 6), (30, 7)] {
        assert_eq!(read_vec(&img, block * bs, 4096), pattern(seed, 4096));
    }
    drop(file);
    ThinImage::end_passthrough(&img).unwrap();
    assert!(!marker_exists(dir.path()) && !img.is_passthrough());
    assert_eq!(img.usage().allocated_blocks, 3);
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 30 * bs, 4096), pattern(7, 4096));
}

#[test]
fn discard_in_passthrough_punches_and_unmaps() {
    let bs = 16u64 << 10;
    let size = 2 * MIB;
    let (dir, img) = new_image(size, bs as u32);
    img.write_at(&pattern(1, 4 * bs as usize), 0).unwrap(); // mapped 0..4
    let file = img.begin_passthrough().unwrap().unwrap();
    file.write_all_at(&pattern(2, 4 * bs as usize), 4 * bs)
        .unwrap(); // 4..8, unknown to the map
    let mut model = pattern(1, 4 * bs as usize);
    model.extend(pattern(2, 4 * bs as usize));
    model.resize(size as usize, 0);
    let disk_before = data_disk_bytes(dir.path());
    // Part of 1, all of 2..=5, part of 6; and a piece inside block 7.
    let (start, end) = (bs + 100, 6 * bs + 300);
    img.discard(start, end - start).unwrap();
    img.discard(7 * bs + 10, 20).unwrap();
    model[start as usize..end as usize].fill(0);
    model[7 * bs as usize + 10..][..20].fill(0);
    assert!(read_vec(&img, 0, size as usize) == model);
    let mut through = vec![0u8; size as usize];
    read_full(&file, &mut through, 0).unwrap();
    assert!(through == model);
    assert!(disk_before - data_disk_bytes(dir.path()) >= 4 * bs);
    // Whole blocks 2 and 3, once mapped, are unmapped.
    assert_eq!(img.map.get(2), Entry::UNMAPPED);
    assert_eq!(img.map.get(3), Entry::UNMAPPED);
    assert_eq!(img.map.get(1).phys(), Some(1));
    let usage = img.usage().allocated_blocks;
    assert!((4..=5).contains(&usage), "{usage}");
    img.flush().unwrap();
    // A discarded block written again through the file is adopted.
    file.write_all_at(&[9; 10], 3 * bs).unwrap();
    model[3 * bs as usize..][..10].fill(9);
    drop(file);
    img.end_passthrough().unwrap();
    assert!(read_vec(&img, 0, size as usize) == model);
    let mut mapped: Vec<u64> = Vec::new();
    img.map.for_each_mapped(|b, e| {
        assert_eq!(e.phys(), Some(b));
        mapped.push(b)
    });
    assert_eq!(mapped, vec![0, 1, 3, 6, 7]);
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert!(read_vec(&img, 0, size as usize) == model);
}

#[test]
fn non_identity_image_refuses_passthrough() {
    let (dir, mut img) = new_image(MIB, 4096);
    img.set_identity_placement(false);
    img.write_at(&pattern(1, 100), 5 * 4096).unwrap(); // logical 5 on physical 0
    assert!(!img.is_identity());
    assert!(img.begin_passthrough().unwrap().is_none());
    assert!(BlockEngine::begin_passthrough(&img).is_none());
    assert!(!img.is_passthrough() && !marker_exists(dir.path()));
    BlockEngine::end_passthrough(&img);
    assert_eq!(read_vec(&img, 5 * 4096, 100), pattern(1, 100));
    // Once the odd block is gone (and flushed), it is identity again.
    img.discard(5 * 4096, 4096).unwrap();
    assert!(img.is_identity());
    let engine: &dyn BlockEngine = &img;
    let file = engine
        .begin_passthrough()
        .expect("identity after the discard");
    file.write_all_at(&[3; 10], 0).unwrap();
    engine.end_passthrough();
    assert!(!img.is_passthrough() && !marker_exists(dir.path()));
    assert_eq!(read_vec(&img, 0, 10), [3; 10]);
}

/// Multi-block IO (stripes wrap, up to all of them), discards, flushes
/// and passthrough switching, concurrently, against per-thread models.
#[test]
fn concurrent_big_io_and_passthrough_switching_match_model() {
    const THREADS: u64 = 3;
    let bs = 4096u64;
    let region = 400 * bs + 777;
    let size = (THREADS * region).div_ceil(4096) * 4096;
    let (dir, img) = new_image(size, bs as u32);
    let img = Arc::new(img);
    let stop = Arc::new(AtomicBool::new(false));
    let switcher = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut files = 0;
            while !stop.load(Ordering::Relaxed) {
                if img.begin_passthrough().unwrap().is_some() {
                    files += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
                img.end_passthrough().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            files
        })
    };
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || model_thread(&img, t, region, t + 101, 400, 300 * bs))
        })
        .collect();
    let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    assert!(switcher.join().unwrap() > 0);
    let img = Arc::into_inner(img).unwrap();
    assert!(img.is_identity());
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    for (t, model) in models.iter().enumerate() {
        assert_eq!(
            &read_vec(&img, t as u64 * region, region as usize),
            model,
            "thread {t}"
        );
    }
}
