use super::super::copies::testing::{from_another_boot, records};
use super::super::tests::{data_syncs, io_counts, map_bytes, new_image, read_vec, KIB, MIB};
use super::*;
use crate::engine::pattern::pattern;
use crate::engine::BlockEngine;
use std::ops::Range;
use std::sync::atomic::AtomicU64;

fn view_vec(img: &ThinImage, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let view = img.snapshot_view(name).unwrap();
    let mut buf = vec![0xAA; len];
    view.read_at(&mut buf, offset).unwrap();
    buf
}

fn disk_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn info<'a>(infos: &'a [SnapshotInfo], name: &str) -> &'a SnapshotInfo {
    infos.iter().find(|i| i.name == name).unwrap()
}

#[test]
fn snapshot_names_are_checked() {
    for good in [
        "a",
        "0",
        "daily-20261112T1200Z",
        "a.b_c-d",
        &"x".repeat(128),
    ] {
        assert!(validate_name(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        ".a",
        "-a",
        "_a",
        "a/b",
        "a b",
        "é",
        "..",
        &"x".repeat(129),
    ] {
        assert!(
            matches!(validate_name(bad), Err(EngineError::BadSnapshotName { .. })),
            "{bad:?}"
        );
    }
    let (_dir, img) = new_image(MIB, 4096);
    assert!(img.snapshot("../x").is_err());
    img.snapshot("s").unwrap();
    assert!(matches!(
        img.snapshot("s"),
        Err(EngineError::SnapshotExists { .. })
    ));
    assert!(matches!(
        img.delete_snapshot("nope"),
        Err(EngineError::NoSuchSnapshot { .. })
    ));
}

#[test]
fn snapshot_keeps_old_data_and_writes_copy_on_write() {
    let bs = 64 * KIB;
    let size = 4 * MIB;
    let (dir, img) = new_image(size, bs as u32);
    let old = pattern(1, 8 * bs as usize);
    img.write_at(&old, 0).unwrap();
    img.snapshot("s1").unwrap();
    assert_eq!(img.usage().shared_blocks, 8);
    assert_eq!(img.usage().exclusive_blocks, 0);

    let mut new = old.clone();
    // Partial overwrite of block 1: the rest of the block stays.
    new[bs as usize + 100..][..100].copy_from_slice(&pattern(2, 100));
    img.write_at(&pattern(2, 100), bs + 100).unwrap();
    // Whole block 2, an unaligned write across blocks 5 and 6.
    new[2 * bs as usize..][..bs as usize].copy_from_slice(&pattern(3, bs as usize));
    img.write_at(&pattern(3, bs as usize), 2 * bs).unwrap();
    new[5 * bs as usize + 7..][..bs as usize].copy_from_slice(&pattern(4, bs as usize));
    img.write_at(&pattern(4, bs as usize), 5 * bs + 7).unwrap();
    // A discard of block 3, a partial discard in block 4, zeros to 7.
    img.discard(3 * bs, bs).unwrap();
    new[3 * bs as usize..][..bs as usize].fill(0);
    img.discard(4 * bs + 10, 20).unwrap();
    new[4 * bs as usize + 10..][..20].fill(0);
    img.write_at(&[0u8; 50], 7 * bs + 1).unwrap();
    new[7 * bs as usize + 1..][..50].fill(0);

    assert_eq!(read_vec(&img, 0, 8 * bs as usize), new);
    assert_eq!(view_vec(&img, "s1", 0, 8 * bs as usize), old);
    // The whole device: nothing else.
    assert!(view_vec(&img, "s1", 8 * bs, (size - 8 * bs) as usize)
        .iter()
        .all(|&b| b == 0));
    let usage = img.usage();
    // Blocks 1, 2, 4, 5, 6, 7 copied; 3 discarded; 0 untouched.
    assert_eq!(usage.allocated_blocks, 7);
    assert_eq!(usage.shared_blocks, 1);
    assert_eq!(usage.exclusive_blocks, 6);
    assert_eq!(usage.snapshot_blocks, 7);
    assert_eq!(usage.snapshots, 1);
    // Copies are placed above the identity homes.
    assert_eq!(img.map.get(0).phys(), Some(0));
    assert!(img.map.get(1).phys().unwrap() >= size / bs);
    // Block 3's home is held by the snapshot: a new write to it goes
    // above the homes too, not to an unmapped block's home.
    img.write_at(&[1; 10], 3 * bs).unwrap();
    new[3 * bs as usize..][..10].fill(1);
    assert!(img.map.get(3).phys().unwrap() >= size / bs);
    img.discard(3 * bs, bs).unwrap();
    new[3 * bs as usize..][..10].fill(0);
    // A second write to a copied block goes in place.
    let phys = img.map.get(1).phys();
    img.write_at(&pattern(5, 10), bs).unwrap();
    new[bs as usize..][..10].copy_from_slice(&pattern(5, 10));
    assert_eq!(img.map.get(1).phys(), phys);

    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, 8 * bs as usize), new);
    assert_eq!(view_vec(&img, "s1", 0, 8 * bs as usize), old);
    let usage = img.usage();
    assert_eq!((usage.shared_blocks, usage.snapshot_blocks), (1, 7));
    let infos = img.snapshots().unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!((infos[0].blocks, infos[0].exclusive_blocks), (8, 7));
    assert!(infos[0].clones.is_empty());
}

#[test]
fn taking_a_snapshot_copies_no_data() {
    let bs = 4096u64;
    let (dir, img) = new_image(256 * MIB, bs as u32);
    for i in 0..64u64 {
        img.write_at(&pattern(i, 64 * KIB as usize), i * 3 * MIB)
            .unwrap();
    }
    img.flush().unwrap();
    let data = dir.path().join(DATA_FILE);
    let before = disk_bytes(&data);
    assert!(!img.write_may_wait(0, 4096), "nothing shared yet");
    img.snapshot("s").unwrap();
    img.snapshot("t").unwrap();
    assert_eq!(disk_bytes(&data), before);
    // A write to a shared block copies it first.
    assert!(img.write_may_wait(3 * MIB + 100, 10));
    assert!(!img.write_may_wait(MIB, 4096), "unmapped: nothing to copy");
    img.write_at(&[7; 10], 3 * MIB + 100).unwrap();
    assert!(!img.write_may_wait(3 * MIB, 4096), "copied: its own now");
    // The map copy costs what the map holds: 64 pages here (and the
    // filesystem's extent tree), of a 512 KiB map file.
    let snap = snap_path(dir.path(), "s");
    assert_eq!(
        std::fs::metadata(&snap).unwrap().len(),
        BlockMap::file_len(256 * MIB / bs)
    );
    assert!(disk_bytes(&snap) <= 66 * 4096, "{}", disk_bytes(&snap));
    assert_eq!(disk_bytes(&snap), disk_bytes(&dir.path().join(MAP_FILE)));
}

#[test]
fn delete_frees_exactly_the_blocks_only_it_held() {
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    let data = dir.path().join(DATA_FILE);
    let v = |version: u64, block: u64| pattern(version * 1000 + block, bs as usize);
    let write = |version: u64, blocks: Range<u64>| {
        for b in blocks {
            img.write_at(&v(version, b), b * bs).unwrap();
        }
    };
    write(1, 0..16);
    img.snapshot("a").unwrap();
    write(2, 0..8); // a alone holds v1 of 0..8
    img.snapshot("b").unwrap();
    write(3, 0..4); // b alone holds v2 of 0..4
    write(3, 8..10); // a and b hold v1 of 8..10
    let usage = img.usage();
    assert_eq!(usage.allocated_blocks, 16);
    assert_eq!(usage.shared_blocks, 4 + 6); // v2 of 4..8, v1 of 10..16
    assert_eq!(usage.exclusive_blocks, 6);
    assert_eq!(usage.snapshot_blocks, 8 + 4 + 2);
    let infos = img.snapshots().unwrap();
    assert_eq!(info(&infos, "a").exclusive_blocks, 8);
    assert_eq!(info(&infos, "b").exclusive_blocks, 4);
    assert_eq!(info(&infos, "a").blocks, 16);

    img.flush().unwrap();
    let before = disk_bytes(&data);
    img.delete_snapshot("b").unwrap();
    img.flush().unwrap();
    assert_eq!(before - disk_bytes(&data), 4 * bs);
    let usage = img.usage();
    assert_eq!(usage.shared_blocks, 6);
    assert_eq!(usage.snapshot_blocks, 8 + 2);
    assert_eq!(usage.snapshots, 1);
    // a still reads its own, shared parts included.
    for b in 0..16 {
        assert_eq!(
            view_vec(&img, "a", b * bs, bs as usize),
            v(1, b),
            "block {b}"
        );
    }
    // The freed blocks are reused, after the flush that released them.
    let high = img.alloc.high_water();
    write(4, 20..24);
    img.snapshot("c").unwrap();
    write(5, 20..24);
    assert_eq!(img.alloc.high_water(), high);

    img.delete_snapshot("c").unwrap();
    let before = disk_bytes(&data);
    img.delete_snapshot("a").unwrap();
    img.flush().unwrap();
    assert_eq!(before - disk_bytes(&data), 10 * bs);
    let usage = img.usage();
    assert_eq!((usage.shared_blocks, usage.snapshot_blocks), (0, 0));
    assert_eq!(usage.exclusive_blocks, 20);
    let expect = |b: u64| match b {
        0..=3 | 8..=9 => v(3, b),
        4..=7 => v(2, b),
        20..=23 => v(5, b),
        _ => v(1, b),
    };
    for b in (0..16).chain(20..24) {
        assert_eq!(read_vec(&img, b * bs, bs as usize), expect(b), "block {b}");
    }
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    for b in (0..16).chain(20..24) {
        assert_eq!(read_vec(&img, b * bs, bs as usize), expect(b), "block {b}");
    }
    assert_eq!(img.usage().allocated_blocks, 20);
    assert!(!snap_path(dir.path(), "a").exists());
}

#[test]
fn a_crash_between_removal_and_punch_is_repaired_by_open() {
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    let data = dir.path().join(DATA_FILE);
    img.write_at(&pattern(1, 16 * bs as usize), 0).unwrap();
    img.snapshot("s").unwrap();
    img.write_at(&pattern(2, 8 * bs as usize), 0).unwrap();
    img.flush().unwrap();
    let before = disk_bytes(&data);
    // Delete's first step done, durably; the process dies before the punches.
    std::fs::remove_file(snap_path(dir.path(), "s")).unwrap();
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    let usage = img.usage();
    assert_eq!((usage.shared_blocks, usage.snapshot_blocks), (0, 0));
    assert_eq!(usage.snapshots, 0);
    assert_eq!(before - disk_bytes(&data), 8 * bs);
    let mut expect = pattern(1, 16 * bs as usize);
    expect[..8 * bs as usize].copy_from_slice(&pattern(2, 8 * bs as usize));
    assert_eq!(read_vec(&img, 0, 16 * bs as usize), expect);
    // Writes go in place again: nothing is shared.
    let phys = img.map.get(9).phys();
    img.write_at(&[7; 10], 9 * bs).unwrap();
    assert_eq!(img.map.get(9).phys(), phys);
}

#[test]
fn copy_on_write_survives_crashes() {
    let bs = 16 * KIB;
    let (dir, img) = new_image(MIB, bs as u32);
    let old = pattern(1, 8 * bs as usize);
    img.write_at(&old, 0).unwrap();
    img.snapshot("s").unwrap();
    img.write_at(&pattern(2, 100), bs + 50).unwrap();
    img.flush().unwrap();
    let flushed = map_bytes(dir.path());
    // Copies not flushed: partial, whole, unaligned.
    img.write_at(&pattern(3, 100), 2 * bs + 50).unwrap();
    img.write_at(&pattern(4, bs as usize), 3 * bs).unwrap();
    img.write_at(&pattern(5, 3000), 5 * bs - 1000).unwrap();
    img.discard(6 * bs, bs).unwrap();
    img.power_cut(dir.path(), &flushed);

    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(view_vec(&img, "s", 0, 8 * bs as usize), old);
    let got = read_vec(&img, 0, 8 * bs as usize);
    let block = |b: u64| &got[(b * bs) as usize..((b + 1) * bs) as usize];
    let old_block = |b: u64| &old[(b * bs) as usize..((b + 1) * bs) as usize];
    let mut b1 = old_block(1).to_vec();
    b1[50..150].copy_from_slice(&pattern(2, 100));
    assert_eq!(block(1), &b1[..], "flushed copy lost");
    // The others: old, or new over old, never zeros around the write.
    let mut b2 = old_block(2).to_vec();
    b2[50..150].copy_from_slice(&pattern(3, 100));
    assert!(block(2) == old_block(2) || block(2) == &b2[..]);
    assert!(block(3) == old_block(3) || block(3) == &pattern(4, bs as usize)[..]);
    assert!(block(6) == old_block(6) || block(6).iter().all(|&b| b == 0));
    for b in [0, 7] {
        assert_eq!(block(b), old_block(b));
    }
    img.crash();
    // A kill -9 loses nothing the image was told.
    let img = ThinImage::open(dir.path()).unwrap();
    img.write_at(&pattern(6, 100), 2 * bs + 50).unwrap();
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    let mut b2 = old_block(2).to_vec();
    b2[50..150].copy_from_slice(&pattern(6, 100));
    assert_eq!(read_vec(&img, 2 * bs, bs as usize), b2);
    assert_eq!(view_vec(&img, "s", 0, 8 * bs as usize), old);
}

#[test]
fn copies_cost_no_sync_and_reach_the_map_at_the_flush() {
    let bs = 16 * KIB;
    let (dir, img) = new_image(MIB, bs as u32);
    img.write_at(&pattern(1, 8 * bs as usize), 0).unwrap();
    img.snapshot("s").unwrap();
    let (syncs, map_before) = (data_syncs(&img), map_bytes(dir.path()));
    img.write_at(&pattern(2, 100), bs + 50).unwrap();
    img.write_at(&pattern(3, 2 * bs as usize), 3 * bs).unwrap();
    assert_eq!(data_syncs(&img), syncs, "a copy synced the data file");
    assert_eq!(records(dir.path()), 3, "one record per copied block");
    assert_eq!(
        map_bytes(dir.path()),
        map_before,
        "a copy's entry reached the map file before a flush synced its data"
    );
    img.flush().unwrap();
    assert_eq!(data_syncs(&img), syncs + 1);
    assert_ne!(map_bytes(dir.path()), map_before);
    let journal = img.copies.path().to_path_buf();
    assert_eq!(
        std::fs::metadata(journal).unwrap().len(),
        0,
        "flushed copies stay journaled"
    );
    // Written in place now: nothing copied, nothing journaled.
    img.write_at(&pattern(4, 100), bs + 500).unwrap();
    assert_eq!(records(dir.path()), 0);
}

#[test]
fn unflushed_copies_survive_a_kill_and_are_dropped_after_a_machine_restart() {
    let bs = 16 * KIB;
    let (dir, img) = new_image(MIB, bs as u32);
    let old = pattern(1, 8 * bs as usize);
    img.write_at(&old, 0).unwrap();
    img.snapshot("s").unwrap();
    let mut model = old.clone();
    let write = |img: &ThinImage, model: &mut Vec<u8>, seed: u64, at: u64, len: usize| {
        let data = pattern(seed, len);
        model[at as usize..][..len].copy_from_slice(&data);
        img.write_at(&data, at).unwrap();
    };
    // Copied, then written again in place, then a whole-block copy.
    write(&img, &mut model, 2, 2 * bs + 50, 100);
    write(&img, &mut model, 3, 2 * bs + 4000, 100);
    write(&img, &mut model, 4, 3 * bs, bs as usize);
    img.crash(); // kill -9: the page cache keeps the journal and the data
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(
        read_vec(&img, 0, 8 * bs as usize),
        model,
        "a kill lost a copy"
    );
    assert_eq!(records(dir.path()), 0, "open persists the copies it maps");
    assert_eq!(view_vec(&img, "s", 0, 8 * bs as usize), old);
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, 8 * bs as usize), model);

    // A machine restart whose page cache lost a copy's data: the block
    // reads as at the last flush, never as the lost copy's zeros.
    let at_flush = model.clone();
    write(&img, &mut model, 5, 5 * bs + 10, 100);
    let copy = img.map.get(5).phys().unwrap();
    img.crash();
    let data = File::options()
        .write(true)
        .open(dir.path().join(DATA_FILE))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&data, &vec![0u8; bs as usize], copy * bs).unwrap();
    from_another_boot(dir.path());
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, 8 * bs as usize), at_flush);
    assert_eq!(records(dir.path()), 0);
    assert_eq!(
        img.usage().shared_blocks,
        8 - 2,
        "blocks 2 and 3 are copied"
    );
    // The dropped copy's block went back: the block copies again.
    write(&img, &mut model, 6, 5 * bs + 10, 100);
    img.flush().unwrap();
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, 8 * bs as usize), model);
    assert_eq!(view_vec(&img, "s", 0, 8 * bs as usize), old);
}

#[test]
fn a_long_journal_is_flushed_by_the_copy_that_fills_it() {
    let bs = 4 * KIB;
    let (dir, img) = new_image(MIB, bs as u32);
    img.write_at(&pattern(1, MIB as usize), 0).unwrap();
    img.snapshot("s").unwrap();
    let syncs = data_syncs(&img);
    let mut most = 0;
    for b in 0..200 {
        img.write_at(&pattern(2 + b, 100), b * bs).unwrap();
        most = most.max(records(dir.path()));
    }
    assert!(most <= 64, "the journal grew to {most} records");
    assert!(data_syncs(&img) >= syncs + 3, "no flush emptied it");
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    for b in 0..200 {
        assert_eq!(
            read_vec(&img, b * bs, 100),
            pattern(2 + b, 100),
            "block {b}"
        );
    }
}

#[test]
fn a_torn_journal_keeps_its_whole_records() {
    let bs = 16 * KIB;
    let (dir, img) = new_image(MIB, bs as u32);
    img.write_at(&pattern(1, 4 * bs as usize), 0).unwrap();
    img.snapshot("s").unwrap();
    let new = pattern(2, 100);
    img.write_at(&new, bs).unwrap();
    img.crash();
    let path = dir.path().join(super::super::copies::COPIES_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0xFF; 20]); // half a record
    std::fs::write(&path, &bytes).unwrap();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, bs, 100), new);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

#[test]
fn restore_drops_the_copies_of_the_map_it_replaces() {
    let bs = 16 * KIB;
    let (dir, img) = new_image(MIB, bs as u32);
    let old = pattern(1, 4 * bs as usize);
    img.write_at(&old, 0).unwrap();
    img.snapshot("s").unwrap();
    img.write_at(&pattern(2, 100), bs).unwrap();
    img.crash(); // its copy journaled, not flushed
    assert_eq!(records(dir.path()), 1);
    ThinImage::restore(dir.path(), "s").unwrap();
    assert_eq!(records(dir.path()), 0);
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(
        read_vec(&img, 0, 4 * bs as usize),
        old,
        "a copy undid the restore"
    );
}

#[test]
fn copies_read_only_what_they_keep_and_write_runs_at_once() {
    let bs = 32 * KIB;
    let size = 8 * MIB;
    let (dir, img) = new_image(size, bs as u32);
    let old = pattern(1, size as usize);
    img.write_at(&old, 0).unwrap();
    img.snapshot("s").unwrap();
    let mut model = old.clone();
    let mut write = |img: &ThinImage, seed: u64, at: u64, len: usize| {
        let data = pattern(seed, len);
        model[at as usize..][..len].copy_from_slice(&data);
        let before = io_counts(img);
        img.write_at(&data, at).unwrap();
        let after = io_counts(img);
        (after.0 - before.0, after.1 - before.1)
    };
    // A block written whole: nothing read, one write.
    assert_eq!(write(&img, 2, 3 * bs, bs as usize), (0, 1));
    // 4 KiB inside a block: one read (the block), one write.
    assert_eq!(write(&img, 3, 5 * bs + 8192, 4096), (1, 1));
    // 1 MiB over 32 shared blocks: one write, to consecutive blocks.
    assert_eq!(write(&img, 4, MIB, MIB as usize), (0, 1));
    let first = img.map.get(MIB / bs).phys().unwrap();
    assert!(first >= size / bs);
    for b in 0..MIB / bs {
        assert_eq!(img.map.get(MIB / bs + b).phys(), Some(first + b));
    }
    // Now mapped side by side: an overwrite is one write too.
    assert_eq!(write(&img, 5, MIB, MIB as usize), (0, 1));
    // Unaligned over shared blocks: the head's and the tail's old bytes
    // read, one write.
    assert_eq!(write(&img, 6, 3 * MIB + 1000, MIB as usize), (2, 1));
    // Across copied, shared and copied blocks: the one between is
    // copied, nothing read; the others are written in place.
    assert_eq!(write(&img, 7, 4 * bs - 100, bs as usize + 200), (0, 3));
    assert_eq!(read_vec(&img, 0, size as usize), model);
    assert_eq!(view_vec(&img, "s", 0, size as usize), old);
    // The copies are mapped durably: after a crash, and a reopen.
    img.flush().unwrap();
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, size as usize), model);
    assert_eq!(view_vec(&img, "s", 0, size as usize), old);
    let copied = 1 + 1 + 32 + 33 + 1;
    assert_eq!(img.usage().shared_blocks, size / bs - copied);
    assert_eq!(img.usage().snapshot_blocks, copied);
}

#[test]
fn restore_returns_to_the_snapshot_and_frees_the_rest() {
    let bs = 4096u64;
    let (dir, img) = new_image(MIB, bs as u32);
    let data = dir.path().join(DATA_FILE);
    let v1 = pattern(1, 32 * bs as usize);
    img.write_at(&v1, 0).unwrap();
    img.discard(4 * bs, bs).unwrap();
    let mut at_snap = v1.clone();
    at_snap[4 * bs as usize..5 * bs as usize].fill(0);
    img.snapshot("s").unwrap();
    img.write_at(&pattern(2, 8 * bs as usize), 0).unwrap(); // copies
    img.write_at(&pattern(3, 16 * bs as usize), 100 * bs)
        .unwrap(); // new
    img.write_at(&pattern(4, bs as usize), 4 * bs).unwrap(); // a hole then
    img.discard(20 * bs, 4 * bs).unwrap();
    // Refused while open.
    assert!(matches!(
        ThinImage::restore(dir.path(), "s"),
        Err(EngineError::Io { .. })
    ));
    drop(img);
    let before = disk_bytes(&data);
    assert!(matches!(
        ThinImage::restore(dir.path(), "nope"),
        Err(EngineError::NoSuchSnapshot { .. })
    ));
    ThinImage::restore(dir.path(), "s").unwrap();
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(read_vec(&img, 0, 32 * bs as usize), at_snap);
    assert!(read_vec(&img, 100 * bs, 16 * bs as usize)
        .iter()
        .all(|&b| b == 0));
    let usage = img.usage();
    assert_eq!(usage.allocated_blocks, 31);
    assert_eq!((usage.shared_blocks, usage.snapshot_blocks), (31, 0));
    // 7 copies (block 4 was a hole: written in place), 16 new blocks,
    // block 4.
    assert_eq!(before - disk_bytes(&data), 24 * bs);
    // The snapshot stays, and writes copy again.
    img.write_at(&pattern(5, 10), 0).unwrap();
    assert_eq!(view_vec(&img, "s", 0, 32 * bs as usize), at_snap);
}

#[test]
fn passthrough_and_snapshots_exclude_each_other() {
    let (dir, img) = new_image(MIB, 4096);
    img.write_at(&pattern(1, 8192), 0).unwrap();
    img.snapshot("s").unwrap();
    assert!(matches!(
        img.begin_passthrough(),
        Err(EngineError::Shared { .. })
    ));
    assert!(BlockEngine::begin_passthrough(&img).is_none());
    assert!(!img.is_passthrough());
    img.delete_snapshot("s").unwrap();
    // No copy was made: identity still, passthrough again.
    assert!(img.is_identity());
    let file = img.begin_passthrough().unwrap().unwrap();
    assert!(matches!(
        img.snapshot("t"),
        Err(EngineError::InPassthrough { .. })
    ));
    assert!(img.snapshots().unwrap().is_empty());
    assert!(!snap_path(dir.path(), "t").exists());
    drop(file);
    img.end_passthrough().unwrap();
    img.snapshot("t").unwrap();
    assert_eq!(view_vec(&img, "t", 0, 8192), pattern(1, 8192));
}

#[test]
fn a_viewed_snapshot_is_not_deleted() {
    let (_dir, img) = new_image(MIB, 4096);
    img.write_at(&pattern(1, 4096), 0).unwrap();
    img.snapshot("s").unwrap();
    let view = img.snapshot_view("s").unwrap();
    assert!(matches!(
        img.delete_snapshot("s"),
        Err(EngineError::SnapshotBusy { .. })
    ));
    img.write_at(&pattern(2, 4096), 0).unwrap();
    let mut buf = vec![0; 4096];
    view.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(1, 4096));
    assert_eq!(view.name(), "s");
    assert_eq!(view.size(), MIB);
    drop(view);
    img.delete_snapshot("s").unwrap();
    assert!(matches!(
        img.snapshot_view("s"),
        Err(EngineError::NoSuchSnapshot { .. })
    ));
}

fn new_clone(base: &Path, snap: &str) -> (tempfile::TempDir, ThinImage) {
    let dir = tempfile::tempdir().unwrap();
    let img = ThinImage::create_clone(dir.path(), base, snap).unwrap();
    (dir, img)
}

#[test]
fn clone_reads_its_base_and_writes_diverge_both_ways() {
    let bs = 16 * KIB;
    let size = 2 * MIB;
    let (bdir, base) = new_image(size, bs as u32);
    let v1 = pattern(1, 16 * bs as usize);
    base.write_at(&v1, 0).unwrap();
    base.snapshot("s").unwrap();
    let (cdir, clone) = new_clone(bdir.path(), "s");
    assert!(clone.is_clone() && !clone.is_identity());
    assert_eq!((clone.size(), clone.block_size()), (size, bs as u32));
    assert_eq!(read_vec(&clone, 0, size as usize)[..v1.len()], v1[..]);
    assert_eq!(clone.usage().allocated_blocks, 0);
    // No passthrough for a clone: its unwritten blocks are the base's.
    assert!(clone.begin_passthrough().unwrap().is_none());

    // The base moves on: the clone keeps the snapshot's content.
    base.write_at(&pattern(2, 4 * bs as usize), 0).unwrap();
    assert_eq!(read_vec(&clone, 0, v1.len()), v1);
    // The clone moves on: partial (copy-up), whole, straddling, zeros.
    let mut cv = v1.clone();
    let writes = [
        (bs + 100, pattern(3, 100)),
        (2 * bs, pattern(4, bs as usize)),
        (5 * bs - 7, pattern(5, 20)),
        (7 * bs + 3, vec![0u8; 10]),
        (40 * bs + 5, pattern(6, 10)), // no base data there
    ];
    cv.resize(size as usize, 0);
    for (at, data) in &writes {
        clone.write_at(data, *at).unwrap();
        cv[*at as usize..][..data.len()].copy_from_slice(data);
    }
    assert_eq!(read_vec(&clone, 0, size as usize), cv);
    let mut bv = v1.clone();
    bv[..4 * bs as usize].copy_from_slice(&pattern(2, 4 * bs as usize));
    assert_eq!(read_vec(&base, 0, bv.len()), bv);
    assert_eq!(view_vec(&base, "s", 0, v1.len()), v1);
    // Copied-up blocks land at their own index in the clone's file.
    assert_eq!(clone.map.get(1).phys(), Some(1));
    assert_eq!(clone.usage().allocated_blocks, 6);

    drop(clone);
    let clone = ThinImage::open(cdir.path()).unwrap();
    assert_eq!(read_vec(&clone, 0, size as usize), cv);
    // Two images open at once, each with its own lock: fine.
    assert_eq!(read_vec(&base, 0, bv.len()), bv);
}

#[test]
fn clone_discard_reads_zeros_over_base_data() {
    let bs = 8 * KIB;
    let (bdir, base) = new_image(MIB, bs as u32);
    let v1 = pattern(1, 16 * bs as usize);
    base.write_at(&v1, 0).unwrap();
    base.snapshot("s").unwrap();
    let (cdir, clone) = new_clone(bdir.path(), "s");
    clone.write_at(&pattern(2, bs as usize), 3 * bs).unwrap();
    let mut cv = v1.clone();
    cv[3 * bs as usize..][..bs as usize].copy_from_slice(&pattern(2, bs as usize));
    // Whole blocks 2..=4 (base data, own data), a piece of block 6,
    // and blocks past the base's data.
    clone.discard(2 * bs, 3 * bs).unwrap();
    cv[2 * bs as usize..5 * bs as usize].fill(0);
    clone.discard(6 * bs + 100, 200).unwrap();
    cv[6 * bs as usize + 100..][..200].fill(0);
    clone.discard(10 * bs, 20 * bs).unwrap();
    cv[10 * bs as usize..].fill(0);
    assert_eq!(read_vec(&clone, 0, cv.len()), cv);
    assert!(clone.map.get(2).is_zero() && clone.map.get(4).is_zero());
    assert_eq!(clone.map.get(20), Entry::UNMAPPED);
    // Only the partly discarded block holds space.
    assert_eq!(clone.usage().allocated_blocks, 1);
    // A write into a discarded block reads zeros around it.
    clone.write_at(&[9; 10], 2 * bs + 50).unwrap();
    cv[2 * bs as usize + 50..][..10].fill(9);
    assert_eq!(read_vec(&clone, 0, cv.len()), cv);
    drop(clone);
    let clone = ThinImage::open(cdir.path()).unwrap();
    assert_eq!(read_vec(&clone, 0, cv.len()), cv);
    assert_eq!(read_vec(&base, 0, v1.len()), v1);
}

#[test]
fn a_pinned_snapshot_is_not_deleted_until_the_clone_is_destroyed() {
    let (bdir, base) = new_image(MIB, 4096);
    base.write_at(&pattern(1, 8192), 0).unwrap();
    base.snapshot("s").unwrap();
    let (cdir, clone) = new_clone(bdir.path(), "s");
    let cpath = cdir.path().canonicalize().unwrap();
    // Again in the same directory: refused, the pin stays.
    assert!(matches!(
        ThinImage::create_clone(cdir.path(), bdir.path(), "s"),
        Err(EngineError::InvalidParams(_))
    ));
    match base.delete_snapshot("s") {
        Err(EngineError::SnapshotPinned { clone: c, name, .. }) => {
            assert_eq!((c, name.as_str()), (cpath.clone(), "s"));
        }
        other => panic!("deleted a pinned snapshot: {other:?}"),
    }
    let infos = base.snapshots().unwrap();
    assert_eq!(infos[0].clones, vec![cpath.clone()]);
    assert_eq!(
        ThinImage::clones_of(bdir.path()).unwrap(),
        vec![("s".to_string(), cpath.clone())]
    );
    // Refused while the clone is open.
    assert!(ThinImage::destroy_clone(cdir.path()).is_err());
    drop(clone);
    ThinImage::destroy_clone(cdir.path()).unwrap();
    ThinImage::destroy_clone(cdir.path()).unwrap(); // nothing left to do
    assert!(matches!(
        ThinImage::open(cdir.path()),
        Err(EngineError::BadClone { .. })
    ));
    assert!(ThinImage::clones_of(bdir.path()).unwrap().is_empty());
    base.delete_snapshot("s").unwrap();
    assert!(!pins_dir(bdir.path(), "s").exists());
    // A clone of a missing snapshot is refused.
    let other = tempfile::tempdir().unwrap();
    assert!(matches!(
        ThinImage::create_clone(other.path(), bdir.path(), "s"),
        Err(EngineError::NoSuchSnapshot { .. })
    ));
}

#[test]
fn a_clone_whose_pin_is_lost_pins_again_when_opened() {
    let (bdir, base) = new_image(MIB, 4096);
    base.snapshot("s").unwrap();
    let (cdir, clone) = new_clone(bdir.path(), "s");
    drop(clone);
    std::fs::remove_dir_all(pins_dir(bdir.path(), "s")).unwrap();
    let clone = ThinImage::open(cdir.path()).unwrap();
    assert!(matches!(
        base.delete_snapshot("s"),
        Err(EngineError::SnapshotPinned { .. })
    ));
    drop(clone);
}

#[test]
fn a_stale_pin_does_not_hold_the_snapshot() {
    let (bdir, base) = new_image(MIB, 4096);
    base.snapshot("s").unwrap();
    let (cdir, clone) = new_clone(bdir.path(), "s");
    drop(clone);
    // The clone's directory removed without destroy_clone (or a crash
    // in the middle of it): the pin names a clone that is gone.
    std::fs::remove_dir_all(cdir.path()).unwrap();
    base.delete_snapshot("s").unwrap();
}

#[test]
fn clone_survives_crash_and_power_cut() {
    let bs = 4096u64;
    let (bdir, base) = new_image(MIB, bs as u32);
    let v1 = pattern(1, 32 * bs as usize);
    base.write_at(&v1, 0).unwrap();
    base.snapshot("s").unwrap();
    drop(base); // the clone does not need its base open
    let (cdir, clone) = new_clone(bdir.path(), "s");
    clone.write_at(&pattern(2, 100), 50).unwrap();
    clone.discard(bs, bs).unwrap();
    clone.flush().unwrap();
    let flushed = map_bytes(cdir.path());
    clone.write_at(&pattern(3, 100), 2 * bs + 50).unwrap();
    clone.write_at(&pattern(4, bs as usize), 3 * bs).unwrap();
    clone.discard(4 * bs, bs).unwrap();
    clone.write_at(&pattern(5, 10), 100 * bs).unwrap();
    clone.power_cut(cdir.path(), &flushed);

    let clone = ThinImage::open(cdir.path()).unwrap();
    let got = read_vec(&clone, 0, 32 * bs as usize);
    let block = |b: u64| &got[(b * bs) as usize..((b + 1) * bs) as usize];
    let base_block = |b: u64| &v1[(b * bs) as usize..((b + 1) * bs) as usize];
    let mut b0 = base_block(0).to_vec();
    b0[50..150].copy_from_slice(&pattern(2, 100));
    assert_eq!(block(0), &b0[..]);
    assert!(block(1).iter().all(|&b| b == 0), "flushed discard undone");
    let mut b2 = base_block(2).to_vec();
    b2[50..150].copy_from_slice(&pattern(3, 100));
    assert!(block(2) == base_block(2) || block(2) == &b2[..]);
    assert!(block(3) == base_block(3) || block(3) == &pattern(4, bs as usize)[..]);
    assert!(block(4) == base_block(4) || block(4).iter().all(|&b| b == 0));
    for b in 5..32 {
        assert_eq!(block(b), base_block(b), "block {b}");
    }
    // A kill -9 keeps everything.
    clone.write_at(&pattern(6, 100), 2 * bs + 50).unwrap();
    clone.discard(4 * bs, bs).unwrap();
    clone.crash();
    let clone = ThinImage::open(cdir.path()).unwrap();
    let mut b2 = base_block(2).to_vec();
    b2[50..150].copy_from_slice(&pattern(6, 100));
    assert_eq!(read_vec(&clone, 2 * bs, bs as usize), b2);
    assert!(read_vec(&clone, 4 * bs, bs as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(read_vec(&clone, 0, bs as usize), b0);
}

#[test]
fn snapshots_and_clones_of_a_clone() {
    let bs = 4096u64;
    let (bdir, base) = new_image(MIB, bs as u32);
    base.write_at(&pattern(1, 8 * bs as usize), 0).unwrap();
    base.snapshot("s").unwrap();
    let (cdir, clone) = new_clone(bdir.path(), "s");
    clone.write_at(&pattern(2, bs as usize), bs).unwrap();
    clone.discard(2 * bs, bs).unwrap();
    let mut at_t = pattern(1, 8 * bs as usize);
    at_t[bs as usize..2 * bs as usize].copy_from_slice(&pattern(2, bs as usize));
    at_t[2 * bs as usize..3 * bs as usize].fill(0);
    clone.snapshot("t").unwrap();
    assert_eq!(clone.usage().shared_blocks, 1);
    // The snapshot of a clone reads through to the clone's base too.
    assert_eq!(view_vec(&clone, "t", 0, at_t.len()), at_t);
    // The clone moves on; a clone of its snapshot does not.
    clone.write_at(&pattern(3, 3 * bs as usize), 0).unwrap();
    let (c2dir, clone2) = new_clone(cdir.path(), "t");
    assert_eq!(read_vec(&clone2, 0, at_t.len()), at_t);
    clone2.write_at(&pattern(4, 10), 5 * bs).unwrap();
    let mut c2 = at_t.clone();
    c2[5 * bs as usize..][..10].copy_from_slice(&pattern(4, 10));
    assert_eq!(read_vec(&clone2, 0, c2.len()), c2);
    // The middle clone cannot go while its snapshot is a base.
    drop(clone);
    assert!(matches!(
        ThinImage::destroy_clone(cdir.path()),
        Err(EngineError::SnapshotPinned { .. })
    ));
    // Restore of a clone to its snapshot.
    ThinImage::restore(cdir.path(), "t").unwrap();
    let clone = ThinImage::open(cdir.path()).unwrap();
    assert_eq!(read_vec(&clone, 0, at_t.len()), at_t);
    drop((clone, clone2));
    let clone2 = ThinImage::open(c2dir.path()).unwrap();
    assert_eq!(read_vec(&clone2, 0, c2.len()), c2);
    drop(clone2);
    ThinImage::destroy_clone(c2dir.path()).unwrap();
    ThinImage::destroy_clone(cdir.path()).unwrap();
    base.delete_snapshot("s").unwrap();
}

/// A change one thread made to its region.
#[derive(Clone, Copy)]
enum Op {
    Write {
        off: u64,
        len: usize,
        seed: u64,
    },
    Discard {
        off: u64,
        len: usize,
    },
    /// A read (checked against the model) or a flush.
    Other,
}

impl Op {
    fn apply(self, model: &mut [u8]) {
        match self {
            Op::Write { off, len, seed } => {
                model[off as usize..][..len].copy_from_slice(&pattern(seed, len))
            }
            Op::Discard { off, len } => model[off as usize..][..len].fill(0),
            Op::Other => {}
        }
    }
}

/// Random IO on region `t`; op `i` is counted in `started[t]` before
/// it begins and in `finished[t]` once it returned. Returns the ops.
#[allow(clippy::too_many_arguments)]
fn logged_thread(
    img: &ThinImage,
    t: usize,
    region: u64,
    seed: u64,
    ops: u64,
    max_len: u64,
    started: &AtomicU64,
    finished: &AtomicU64,
) -> Vec<Op> {
    let base = t as u64 * region;
    let mut model = vec![0u8; region as usize];
    let mut rng = crate::engine::pattern::Rng(seed);
    let mut log = Vec::with_capacity(ops as usize);
    for i in 0..ops {
        let off = rng.below(region);
        let len = rng.below(max_len.min(region - off) + 1) as usize;
        let op = match rng.below(12) {
            0..=6 => Op::Write {
                off,
                len,
                seed: (t as u64) << 32 | i,
            },
            7 | 8 => Op::Discard { off, len },
            _ => Op::Other,
        };
        started.store(i + 1, Ordering::SeqCst);
        match op {
            Op::Write { off, len, seed } => img.write_at(&pattern(seed, len), base + off).unwrap(),
            Op::Discard { off, len } => img.discard(base + off, len as u64).unwrap(),
            Op::Other if i % 2 == 0 => img.flush().unwrap(),
            Op::Other => {
                let mut buf = vec![0u8; len];
                img.read_at(&mut buf, base + off).unwrap();
                assert_eq!(buf, &model[off as usize..][..len], "thread {t} op {i}");
            }
        }
        finished.store(i + 1, Ordering::SeqCst);
        op.apply(&mut model);
        log.push(op);
    }
    log
}

/// Whether `got` is the region after ops `..k`, or, when op `k` is a
/// discard in flight (it unmaps and zeroes piece by piece), in between.
fn matches_after(model: &[u8], next: Option<Op>, got: &[u8]) -> bool {
    if got == model {
        return true;
    }
    let Some(Op::Discard { off, len }) = next else {
        return false;
    };
    let (a, b) = (off as usize, off as usize + len);
    got[..a] == model[..a]
        && got[b..] == model[b..]
        && got[a..b]
            .iter()
            .zip(&model[a..b])
            .all(|(&g, &m)| g == m || g == 0)
}

#[test]
fn concurrent_partial_writes_to_a_shared_block_all_land() {
    const THREADS: usize = 4;
    const BLOCKS: u64 = 32;
    let bs = 16 * KIB;
    let (_dir, img) = new_image(BLOCKS * bs, bs as u32);
    let old = pattern(99, (BLOCKS * bs) as usize);
    img.write_at(&old, 0).unwrap();
    img.snapshot("s").unwrap();
    let img = Arc::new(img);
    let barrier = Arc::new(std::sync::Barrier::new(THREADS));
    let quarter = (bs / 8) as usize; // writes cover half of each block
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (img, barrier) = (img.clone(), barrier.clone());
            std::thread::spawn(move || {
                for block in 0..BLOCKS {
                    barrier.wait();
                    let data = pattern(block * 10 + t as u64, quarter);
                    img.write_at(&data, block * bs + (2 * t * quarter) as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for block in 0..BLOCKS {
        let got = read_vec(&img, block * bs, bs as usize);
        let mut want = old[(block * bs) as usize..((block + 1) * bs) as usize].to_vec();
        for t in 0..THREADS {
            want[2 * t * quarter..][..quarter]
                .copy_from_slice(&pattern(block * 10 + t as u64, quarter));
        }
        assert!(got == want, "block {block}");
    }
    assert_eq!(view_vec(&img, "s", 0, old.len()), old);
    let usage = img.usage();
    assert_eq!(
        (usage.exclusive_blocks, usage.snapshot_blocks),
        (BLOCKS, BLOCKS)
    );
}

#[test]
fn snapshots_under_concurrent_io_hold_the_model_at_their_instant() {
    for bs in [4096u64, 16 * KIB] {
        snapshots_under_concurrent_io(bs);
    }
}

fn snapshots_under_concurrent_io(bs: u64) {
    const THREADS: usize = 3;
    const OPS: u64 = 1200;
    const SNAPS: u64 = 9;
    let region = (192 * KIB / bs) * bs + 777; // regions straddle blocks
    let size = (THREADS as u64 * region).div_ceil(4096) * 4096;
    let (dir, img) = new_image(size, bs as u32);
    let img = Arc::new(img);
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let finished: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (img, started, finished) = (img.clone(), started.clone(), finished.clone());
            std::thread::spawn(move || {
                logged_thread(
                    &img,
                    t,
                    region,
                    t as u64 + 71,
                    OPS,
                    12 * KIB,
                    &started[t],
                    &finished[t],
                )
            })
        })
        .collect();
    // (name, per thread: ops surely in it, ops possibly in it)
    let mut taken: Vec<(String, Vec<u64>, Vec<u64>)> = Vec::new();
    for k in 0..SNAPS {
        // Spread the snapshots over the run of thread 0.
        while finished[0].load(Ordering::SeqCst) < (k + 1) * OPS / (SNAPS + 1) {
            std::thread::yield_now();
        }
        let lo: Vec<u64> = finished.iter().map(|f| f.load(Ordering::SeqCst)).collect();
        let name = format!("s{k}");
        img.snapshot(&name).unwrap();
        let hi: Vec<u64> = started.iter().map(|s| s.load(Ordering::SeqCst)).collect();
        taken.push((name, lo, hi));
        // Deletes race with the IO too.
        if k % 3 == 2 {
            let (gone, _, _) = taken.remove(taken.len() - 2);
            img.delete_snapshot(&gone).unwrap();
        }
    }
    let logs: Vec<Vec<Op>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let img = Arc::into_inner(img).unwrap();

    let contents = |img: &ThinImage| -> Vec<Vec<u8>> {
        taken
            .iter()
            .map(|(name, _, _)| view_vec(img, name, 0, size as usize))
            .collect()
    };
    let before = contents(&img);
    for (t, log) in logs.iter().enumerate() {
        let mut model = vec![0u8; region as usize];
        let mut matched = vec![false; taken.len()];
        for k in 0..=OPS {
            for (s, (name, lo, hi)) in taken.iter().enumerate() {
                if matched[s] || !(lo[t]..=hi[t]).contains(&k) {
                    continue;
                }
                let got = &before[s][(t as u64 * region) as usize..][..region as usize];
                matched[s] = matches_after(&model, log.get(k as usize).copied(), got);
                let _ = name;
            }
            if let Some(op) = log.get(k as usize) {
                op.apply(&mut model);
            }
        }
        for (s, ok) in matched.iter().enumerate() {
            let (name, lo, hi) = &taken[s];
            assert!(
                ok,
                "snapshot {name}, thread {t}: no state in ops {}..={}",
                lo[t], hi[t]
            );
        }
        assert_eq!(
            read_vec(&img, t as u64 * region, region as usize),
            model,
            "head of thread {t}"
        );
    }
    assert_eq!(img.usage().snapshots, taken.len() as u64);
    // Durable, and the same after a crash.
    img.crash();
    let img = ThinImage::open(dir.path()).unwrap();
    assert!(contents(&img) == before);
    // Deleting them all returns every block they alone held.
    for (name, _, _) in &taken {
        img.delete_snapshot(name).unwrap();
    }
    let usage = img.usage();
    assert_eq!((usage.shared_blocks, usage.snapshot_blocks), (0, 0));
    img.flush().unwrap();
    drop(img);
    let img = ThinImage::open(dir.path()).unwrap();
    assert_eq!(img.usage().snapshot_blocks, 0);
}

/// What an export of snapshot s2 since s1 sends: the blocks written
/// between them (copies or first writes) and those discarded, never the
/// ones both hold; a whole export sends every mapped block.
#[test]
fn changes_between_snapshots_are_the_blocks_written_or_discarded_between() {
    let bs = 4096u64;
    let (_dir, img) = new_image(64 * bs, 4096);
    img.write_at(&vec![1u8; (8 * bs) as usize], 0).unwrap();
    img.write_at(&vec![2u8; bs as usize], 20 * bs).unwrap();
    img.snapshot("s1").unwrap();
    // Changed: block 3 (a copy), 30..32 (new), 20 (discarded).
    img.write_at(&vec![3u8; bs as usize], 3 * bs).unwrap();
    img.write_at(&vec![4u8; (2 * bs) as usize], 30 * bs)
        .unwrap();
    img.discard(20 * bs, bs).unwrap();
    img.snapshot("s2").unwrap();
    // After s2: not part of it.
    img.write_at(&vec![5u8; bs as usize], 50 * bs).unwrap();
    let s1 = img.snapshot_view("s1").unwrap();
    let s2 = img.snapshot_view("s2").unwrap();
    assert_eq!(
        s2.changes(Some(&s1), 1024),
        [(3, 1, true), (20, 1, false), (30, 2, true)]
    );
    assert_eq!(s1.changes(None, 1024), [(0, 8, true), (20, 1, true)]);
    assert_eq!(
        s1.changes(None, 3),
        [(0, 3, true), (3, 3, true), (6, 2, true), (20, 1, true)]
    );
    assert!(s2.changes(Some(&s2), 1024).is_empty());
}
