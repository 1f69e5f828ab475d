//! The export stream: a snapshot's contents, whole or as the changes since
//! an older snapshot (RBD's `export` and `export-diff`), to be imported
//! into a volume on this or another machine.
//!
//! Layout (integers little-endian): the magic `DNSTREAM`, a version
//! (u32), the header's length (u32), the header as JSON, its CRC-32C (u32);
//! then records, each a kind (u8), an offset and a length (u64 each), the
//! data (data records only) and a CRC-32C of all of it (u32); then an end
//! record (kind 0xFF) whose offset and length are the count of records
//! before it and their data bytes. A record out of the device's range, a
//! bad CRC, or a stream that stops before its end record is refused.

use crate::engine::header::crc32c;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

const MAGIC: &[u8; 8] = b"DNSTREAM";
pub const VERSION: u32 = 1;
/// The largest data record written, and accepted.
pub const MAX_RECORD: u64 = 4 << 20;
/// The largest header accepted.
const MAX_HEADER: u32 = 64 << 10;

const DATA: u8 = 1;
const ZERO: u8 = 2;
const END: u8 = 0xFF;
/// kind, offset, length.
const RECORD_HEAD: usize = 17;

/// What the stream holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamHeader {
    /// The exported volume and snapshot (for messages, and the snapshot
    /// the import takes).
    pub volume: String,
    pub snapshot: String,
    /// Changes since this snapshot only; the importing volume must hold a
    /// snapshot of this name with the same contents.
    pub since: Option<String>,
    /// Device size in bytes.
    pub size: u64,
    /// The exported volume's block size (informative: the stream carries
    /// bytes, not blocks).
    pub block_size: u32,
    /// The filesystem on it (`ext4`, `xfs`, `none`) and whether it was
    /// made: an import of a whole stream takes both, so the volume is not
    /// formatted again.
    pub fs: String,
    pub formatted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a dunnage export stream (no DNSTREAM magic at its start)")]
    NotAStream,
    #[error("export stream version {found} is not one this build reads (it reads {VERSION}); import it with the dunnage that exported it, or a newer one")]
    Version { found: u32 },
    #[error("the export stream is damaged: {0}")]
    Corrupt(String),
    #[error(
        "the export stream ends early (after {records} records): it was cut short; export it again"
    )]
    Truncated { records: u64 },
}

/// A piece of the device, as read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at `offset` are in the reader's buffer.
    Data { offset: u64, len: usize },
    /// `len` bytes at `offset` read as zeros.
    Zero { offset: u64, len: u64 },
}

/// Writes a stream: [`StreamWriter::new`], pieces, [`StreamWriter::finish`].
pub struct StreamWriter<W: Write> {
    w: W,
    size: u64,
    records: u64,
    data_bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(mut w: W, header: &StreamHeader) -> Result<Self, StreamError> {
        let json = serde_json::to_vec(header).expect("a header serializes");
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        w.write_all(&crc32c(&json).to_le_bytes())?;
        Ok(StreamWriter {
            w,
            size: header.size,
            records: 0,
            data_bytes: 0,
        })
    }

    fn record(&mut self, kind: u8, offset: u64, len: u64, data: &[u8]) -> Result<(), StreamError> {
        let mut head = [0u8; RECORD_HEAD];
        head[0] = kind;
        head[1..9].copy_from_slice(&offset.to_le_bytes());
        head[9..17].copy_from_slice(&len.to_le_bytes());
        let crc = ::crc32c::crc32c_append(crc32c(&head), data);
        self.w.write_all(&head)?;
        self.w.write_all(data)?;
        self.w.write_all(&crc.to_le_bytes())?;
        Ok(())
    }

    /// `data` is the device's at `offset` (at most [`MAX_RECORD`] bytes).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), StreamError> {
        let len = data.len() as u64;
        assert!(
            len <= MAX_RECORD && offset + len <= self.size,
            "record out of range"
        );
        self.record(DATA, offset, len, data)?;
        self.records += 1;
        self.data_bytes += len;
        Ok(())
    }

    /// `len` bytes at `offset` read as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        assert!(offset + len <= self.size, "record out of range");
        self.record(ZERO, offset, len, &[])?;
        self.records += 1;
        Ok(())
    }

    /// Write the end record; the writer back, flushed.
    pub fn finish(mut self) -> Result<W, StreamError> {
        let (records, bytes) = (self.records, self.data_bytes);
        self.record(END, records, bytes, &[])?;
        self.w.flush()?;
        Ok(self.w)
    }

    /// Data bytes written so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }
}

/// Reads a stream, checking every piece before handing it out.
pub struct StreamReader<R: Read> {
    r: R,
    header: StreamHeader,
    records: u64,
    data_bytes: u64,
    ended: bool,
    buf: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    pub fn open(mut r: R) -> Result<Self, StreamError> {
        let mut magic = [0u8; 8];
        read_exact(&mut r, &mut magic, 0)?;
        if &magic != MAGIC {
            return Err(StreamError::NotAStream);
        }
        let found = read_u32(&mut r, 0)?;
        if found != VERSION {
            return Err(StreamError::Version { found });
        }
        let len = read_u32(&mut r, 0)?;
        if len > MAX_HEADER {
            return Err(StreamError::Corrupt(format!("a header of {len} bytes")));
        }
        let mut json = vec![0u8; len as usize];
        read_exact(&mut r, &mut json, 0)?;
        if read_u32(&mut r, 0)? != crc32c(&json) {
            return Err(StreamError::Corrupt(
                "the header's checksum does not match".into(),
            ));
        }
        let header: StreamHeader = serde_json::from_slice(&json)
            .map_err(|e| StreamError::Corrupt(format!("an unreadable header: {e}")))?;
        if header.size == 0 {
            return Err(StreamError::Corrupt("a device of 0 bytes".into()));
        }
        Ok(StreamReader {
            r,
            header,
            records: 0,
            data_bytes: 0,
            ended: false,
            buf: Vec::new(),
        })
    }

    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The data of the last [`Piece::Data`].
    pub fn data(&self) -> &[u8] {
        &self.buf
    }

    /// The next piece; `None` after the end record (which is checked).
    pub fn next_piece(&mut self) -> Result<Option<Piece>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        let at = self.records;
        let mut head = [0u8; RECORD_HEAD];
        read_exact(&mut self.r, &mut head, at)?;
        let kind = head[0];
        let offset = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes"));
        let bad = |what: String| StreamError::Corrupt(format!("record {at}: {what}"));
        let data_len = match kind {
            DATA if len > MAX_RECORD => return Err(bad(format!("{len} bytes of data"))),
            DATA => len as usize,
            ZERO | END => 0,
            other => return Err(bad(format!("unknown kind {other}"))),
        };
        self.buf.resize(data_len, 0);
        read_exact(&mut self.r, &mut self.buf, at)?;
        let crc = ::crc32c::crc32c_append(crc32c(&head), &self.buf);
        if read_u32(&mut self.r, at)? != crc {
            return Err(bad("its checksum does not match".into()));
        }
        if kind == END {
            if (offset, len) != (self.records, self.data_bytes) {
                return Err(bad(format!(
                    "the end says {offset} records and {len} data bytes, the stream held {} and {}",
                    self.records, self.data_bytes
                )));
            }
            self.ended = true;
            return Ok(None);
        }
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.header.size)
        {
            return Err(bad(format!(
                "{len} bytes at {offset}, past the device's {} bytes",
                self.header.size
            )));
        }
        self.records += 1;
        Ok(Some(if kind == DATA {
            self.data_bytes += len;
            Piece::Data {
                offset,
                len: data_len,
            }
        } else {
            Piece::Zero { offset, len }
        }))
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], records: u64) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StreamError::Truncated { records },
        _ => StreamError::Io(e),
    })
}

fn read_u32(r: &mut impl Read, records: u64) -> Result<u32, StreamError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b, records)?;
    Ok(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StreamHeader {
        StreamHeader {
            volume: "pg".into(),
            snapshot: "s2".into(),
            since: Some("s1".into()),
            size: 1 << 20,
            block_size: 32 << 10,
            fs: "ext4".into(),
            formatted: true,
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        w.data(4096, &[7u8; 8192]).unwrap();
        w.zero(65536, 32768).unwrap();
        w.data((1 << 20) - 512, &[9u8; 512]).unwrap();
        assert_eq!(w.data_bytes(), 8192 + 512);
        w.finish().unwrap()
    }

    type Pieces = Vec<(Piece, Vec<u8>)>;

    fn read_all(bytes: &[u8]) -> Result<(StreamHeader, Pieces), StreamError> {
        let mut r = StreamReader::open(bytes)?;
        let mut out = Vec::new();
        while let Some(p) = r.next_piece()? {
            out.push((p, r.data().to_vec()));
        }
        Ok((r.header().clone(), out))
    }

    #[test]
    fn a_stream_reads_back_as_written() {
        let (h, pieces) = read_all(&sample()).unwrap();
        assert_eq!(h, header());
        assert_eq!(
            pieces,
            vec![
                (
                    Piece::Data {
                        offset: 4096,
                        len: 8192
                    },
                    vec![7u8; 8192]
                ),
                (
                    Piece::Zero {
                        offset: 65536,
                        len: 32768
                    },
                    vec![]
                ),
                (
                    Piece::Data {
                        offset: (1 << 20) - 512,
                        len: 512
                    },
                    vec![9u8; 512]
                ),
            ]
        );
    }

    #[test]
    fn damage_anywhere_is_refused() {
        let good = sample();
        assert!(matches!(
            read_all(b"not a stream at all"),
            Err(StreamError::NotAStream)
        ));
        let mut v2 = good.clone();
        v2[8] = 2;
        assert!(matches!(
            read_all(&v2),
            Err(StreamError::Version { found: 2 })
        ));
        // Every single flipped byte after the version is caught.
        for i in 12..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad).is_err(), "byte {i} flipped went unnoticed");
        }
        // Every cut is caught, the end record included.
        for cut in 0..good.len() {
            assert!(
                read_all(&good[..cut]).is_err(),
                "cut at {cut} went unnoticed"
            );
        }
        assert!(matches!(
            read_all(&good[..good.len() - 1]),
            Err(StreamError::Truncated { records: 3 })
        ));
    }

    #[test]
    fn records_past_the_device_are_refused() {
        let mut h = header();
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        w.data(0, &[1u8; 4096]).unwrap();
        let bytes = w.finish().unwrap();
        // The same stream claiming a smaller device (header rewritten).
        h.size = 2048;
        let mut small = StreamWriter::new(Vec::new(), &h).unwrap().finish().unwrap();
        let header_len = small.len() - (RECORD_HEAD + 4);
        small.truncate(header_len);
        let full_header = bytes.len() - (RECORD_HEAD + 4096 + 4) - (RECORD_HEAD + 4);
        small.extend_from_slice(&bytes[full_header..]);
        let err = read_all(&small).unwrap_err();
        assert!(err.to_string().contains("past the device"), "{err}");
    }
}
