//! The engine under kill -9: a writer process (`dunnage debug-engine-writer`)
//! writes, discards and flushes; it is killed mid-run, and every flush it
//! reported must have survived while nothing foreign shows up.

use dunnage::engine::pattern::pattern;
use dunnage::engine::{BlockEngine, ThinImage, ThinParams};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

fn read_vec(img: &ThinImage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    img.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn kill9_keeps_flushed_writes() {
    let bs = 4096u64;
    let size = 8 * MIB;
    let dir = tempfile::tempdir().unwrap();
    drop(
        ThinImage::create(
            dir.path(),
            ThinParams {
                size,
                block_size: bs as u32,
            },
        )
        .unwrap(),
    );

    // The writer: regions of 8 blocks, discarding the odd blocks of the
    // previous region, then a flush and a `flushed K` line per region.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dunnage"))
        .arg("debug-engine-writer")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut last: Option<u64> = None;
    let mut line = String::new();
    while last.map_or(true, |k| k < 40) {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "child exited early"
        );
        if let Some(k) = line.trim().strip_prefix("flushed ") {
            last = Some(k.parse().unwrap());
        }
        assert_ne!(line.trim(), "done", "child finished before the kill");
    }
    // Let it run on into unflushed writes, then kill -9.
    std::thread::sleep(std::time::Duration::from_millis(3));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    for l in rest.lines() {
        if let Some(k) = l.trim().strip_prefix("flushed ") {
            last = Some(k.parse().unwrap());
        }
    }
    let last = last.unwrap();

    let img = ThinImage::open(dir.path()).unwrap();
    let zero = vec![0u8; bs as usize];
    let sectors_ok = |got: &[u8], want: &[u8]| {
        got.chunks(512)
            .zip(want.chunks(512))
            .all(|(g, w)| g == w || g.iter().all(|&b| b == 0))
    };
    for j in 0..size / bs {
        let region = j / 8;
        let got = read_vec(&img, j * bs, bs as usize);
        let want = pattern(j, bs as usize);
        if region <= last && (j % 2 == 0 || region == last) {
            if j % 2 == 0 {
                assert_eq!(got, want, "flushed block {j} (last flush {last})");
            } else {
                assert!(got == want || got == zero, "block {j} (last flush {last})");
            }
        } else if region < last {
            assert_eq!(
                got, zero,
                "flushed discard of block {j} undone (last flush {last})"
            );
        } else {
            assert!(
                sectors_ok(&got, &want),
                "block {j} holds foreign data (last flush {last})"
            );
        }
    }
    // Allocations after the crash read zeros around what they write.
    for j in (size / bs - 64)..size / bs {
        img.discard(j * bs, bs).unwrap();
    }
    img.flush().unwrap();
    for j in (size / bs - 64)..size / bs {
        img.write_at(&[0x11; 8], j * bs + 100).unwrap();
        let got = read_vec(&img, j * bs, bs as usize);
        assert!(
            got[..100].iter().chain(&got[108..]).all(|&b| b == 0),
            "block {j}"
        );
    }
}
