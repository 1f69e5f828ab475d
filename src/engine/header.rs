//! The superblock of a thin image: the `header` file, written once at create.
//!
//! 4096 bytes, little-endian, the first 64 of them meaningful:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"DNNGTHIN"` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | block size in bytes |
//! | 16 | 8 | device size in bytes |
//! | 24 | 8 | number of logical blocks (redundant, checked) |
//! | 32 | 8 | incompatible feature bits (an opener refuses unknown bits): bit 0 = [`FEATURE_CLONE`] |
//! | 40 | 20 | reserved, zero |
//! | 60 | 4 | CRC-32C of bytes 0..60 |
//!
//! The rest of the 4 KiB is zero, so the header is one sector-aligned page.

pub(crate) const HEADER_BYTES: usize = 4096;
const MAGIC: [u8; 8] = *b"DNNGTHIN";
const VERSION: u32 = 1;
const CRC_OFFSET: usize = 60;

/// The image is a clone: blocks it never wrote read through to its base
/// (a snapshot of another image, named by the clone's `base` file). A
/// build that does not know clones must not open one as a plain image,
/// whose unwritten blocks read zeros.
pub(crate) const FEATURE_CLONE: u64 = 1;

/// Incompatible feature bits this build understands.
const KNOWN_FEATURES: u64 = FEATURE_CLONE;

/// The decoded superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub size: u64,
    pub block_size: u32,
    pub features: u64,
}

impl Header {
    /// Logical blocks of `block_size` needed to cover `size` (the last may be partial).
    pub fn nblocks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size))
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut buf = [0u8; HEADER_BYTES];
        buf[0..8].copy_from_slice(&MAGIC);
        buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        buf[16..24].copy_from_slice(&self.size.to_le_bytes());
        buf[24..32].copy_from_slice(&self.nblocks().to_le_bytes());
        buf[32..40].copy_from_slice(&self.features.to_le_bytes());
        let crc = crc32c(&buf[..CRC_OFFSET]);
        buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decode and check a header; the error says what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Header, String> {
        if buf.len() < HEADER_BYTES {
            return Err(format!(
                "header is {} bytes, expected {HEADER_BYTES}",
                buf.len()
            ));
        }
        if buf[0..8] != MAGIC {
            return Err("bad magic (not a dunnage thin image)".into());
        }
        let stored = u32_at(buf, CRC_OFFSET);
        let computed = crc32c(&buf[..CRC_OFFSET]);
        if stored != computed {
            return Err(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let version = u32_at(buf, 8);
        if version != VERSION {
            return Err(format!(
                "unsupported format version {version} (this build reads {VERSION})"
            ));
        }
        let header = Header {
            block_size: u32_at(buf, 12),
            size: u64_at(buf, 16),
            features: u64_at(buf, 32),
        };
        let nblocks = u64_at(buf, 24);
        if header.features & !KNOWN_FEATURES != 0 {
            return Err(format!(
                "unknown incompatible features {:#x}",
                header.features & !KNOWN_FEATURES
            ));
        }
        if header.block_size == 0 || nblocks != header.nblocks() {
            return Err(format!(
                "inconsistent geometry: size {} block_size {} blocks {nblocks}",
                header.size, header.block_size
            ));
        }
        Ok(header)
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// CRC-32C (Castagnoli), with the CPU's instruction where it has one.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vector() {
        // The standard check value for CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = Header {
            size: 10 << 30,
            block_size: 32 << 10,
            features: 0,
        };
        let buf = h.encode();
        assert_eq!(Header::decode(&buf), Ok(h));
        for at in [0usize, 9, 13, 20, 33, 61] {
            let mut bad = buf;
            bad[at] ^= 0x40;
            assert!(Header::decode(&bad).is_err(), "flip at {at} accepted");
        }
        assert!(Header::decode(&buf[..100]).is_err());
        let clone = Header {
            features: FEATURE_CLONE,
            ..h
        };
        assert_eq!(Header::decode(&clone.encode()), Ok(clone));
        let unknown = Header { features: 2, ..h };
        assert!(Header::decode(&unknown.encode()).is_err());
    }
}
