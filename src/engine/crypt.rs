//! `CryptEngine`: per-volume encryption, AES-256-XTS per 4 KiB unit, as a
//! [`BlockEngine`] layer over a [`ThinImage`].
//!
//! # Keys
//!
//! The volume's passphrase ([`Secret`]) goes through PBKDF2-HMAC-SHA256
//! (a random 32-byte salt per volume, `iterations` ≥ 100 000, 600 000 by
//! default) to a 32-byte master key, which HKDF-SHA256-Expand stretches to
//! 96 bytes: 64 for XTS (the data key, then the tweak key) and 32 for the
//! key check. Only the master costs PBKDF2's iterations: asking PBKDF2 itself
//! for 96 bytes would run them three times on every open, while an attacker
//! needs only the one output block that holds the check key.
//!
//! The key check value (KCV) is HMAC-SHA256 over a fixed label, keyed by
//! the check key. Testing a passphrase against it costs a full PBKDF2, as
//! testing it against the data would; it reveals nothing of the XTS key
//! (other HKDF output); [`CryptEngine::open`] compares it in constant time
//! and refuses a wrong key ([`EngineError::WrongKey`]) before any IO. The
//! passphrase, the master and the derived keys live only in memory that is
//! zeroized on drop (the AES key schedules too: `aes` is built with
//! `zeroize`); nothing secret is logged, printed by `Debug` or written.
//!
//! # On disk
//!
//! `crypt` in the image directory, small JSON, written once at create
//! (temp file, fsync, rename, fsync of the directory):
//!
//! ```json
//! {"version":1,"cipher":"aes-256-xts","kdf":"pbkdf2-hmac-sha256",
//!  "iterations":600000,"salt":"<64 hex digits>","data_unit_size":4096,
//!  "key_check":"<64 hex digits>"}
//! ```
//!
//! None of it is secret. A snapshot of the image lives in its directory,
//! under the same file; a clone is a directory of its own and needs a copy
//! of it ([`CryptParams::store`]): same key, same ciphertext blocks.
//!
//! # Data
//!
//! The device is cut into 4096-byte data units; unit `i` (bytes
//! `i * 4096 ..`) is encrypted with XTS-AES-256 under the tweak `i` as a
//! little-endian 128-bit number: IEEE 1619's data unit sequence number, the
//! `plain64` IV of dm-crypt with 4096-byte sectors. IO must be aligned to
//! units ([`EngineError::Misaligned`] otherwise); both exports guarantee it
//! (4 KiB logical blocks).
//!
//! *A unit that is all zeros on disk reads as zeros, undecrypted.* The thin
//! image returns zeros for much more than unmapped blocks: the never-written
//! units of a mapped block (its allocation unit, 4 KiB to 1 MiB, is coarser
//! than ours), a discard of part of a block (zeroed in place), and a block
//! whose mapping a crash made durable before its data. All of these must read
//! as zeros (filesystems' lazy init relies on it), and a map query could tell
//! none of them apart from data. Real ciphertext is all zeros with
//! probability 2^-32768, so an all-zero unit is always one of those. XTS has
//! no integrity anyway: whoever can write the disk can already randomize or
//! replay units; this lets them also zero one.
//!
//! A write is encrypted into a per-thread buffer (at most 1 MiB, reused),
//! then written to the image. Plaintext zeros are encrypted like any data,
//! so they allocate: writing all-zero ciphertext instead would keep them
//! thin but show on disk which units hold zeros. Passthrough is always
//! refused: the kernel would write plaintext to the data file.

use super::{is_zero, BlockEngine, EngineError, ThinImage};
use aes::cipher::consts::U16;
use aes::cipher::{
    array::ArraySize, Array, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt,
    BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};
use aes::Aes256;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Name of the parameters file in the image directory.
pub const CRYPT_FILE: &str = "crypt";
const CRYPT_TMP: &str = "crypt.tmp";
/// Encryption unit and required IO alignment, in bytes.
pub const UNIT: u64 = 4096;
pub const CIPHER: &str = "aes-256-xts";
pub const KDF: &str = "pbkdf2-hmac-sha256";
pub const DEFAULT_ITERATIONS: u32 = 600_000;
pub const MIN_ITERATIONS: u32 = 100_000;
/// Refused above: a damaged or hostile `crypt` file would stall open for
/// minutes (10 M iterations take a few seconds).
pub const MAX_ITERATIONS: u32 = 10_000_000;
const FORMAT_VERSION: u32 = 1;
/// HKDF info: binds the derived keys to this use.
const HKDF_INFO: &[u8] = b"dunnage crypt v1: aes-256-xts keys, key check key";
/// What the key check MACs.
const KCV_LABEL: &[u8] = b"dunnage crypt v1: key check";
/// Largest piece a write encrypts at once (bounds the per-thread buffer).
const WRITE_CHUNK: usize = 1 << 20;

thread_local! {
    /// Ciphertext of the write in progress on this thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A volume's passphrase. Zeroized on drop; `Debug` shows no byte of it;
/// deliberately no `Display`, `Clone` or serde.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Take ownership of the passphrase bytes (a `String` or `Vec<u8>` is
    /// moved, not copied).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// The passphrase: for the key derivation, and for the memfd the FUSE
    /// keeper holds (`keys.rs`).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The contents of the `crypt` file (see the module doc). Public values
/// only: salt and key check value are not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptParams {
    /// Format of this file: 1.
    pub version: u32,
    /// [`CIPHER`].
    pub cipher: String,
    /// [`KDF`].
    pub kdf: String,
    /// PBKDF2 iterations, [`MIN_ITERATIONS`] ..= [`MAX_ITERATIONS`].
    pub iterations: u32,
    #[serde(with = "hex32")]
    pub salt: [u8; 32],
    /// [`UNIT`].
    pub data_unit_size: u32,
    /// HMAC-SHA256 of a fixed label under the derived check key.
    #[serde(with = "hex32")]
    pub key_check: [u8; 32],
}

impl CryptParams {
    fn validate(&self) -> Result<(), String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.cipher != CIPHER {
            return Err(format!(
                "cipher {:?} is not supported (only {CIPHER})",
                self.cipher
            ));
        }
        if self.kdf != KDF {
            return Err(format!("kdf {:?} is not supported (only {KDF})", self.kdf));
        }
        if u64::from(self.data_unit_size) != UNIT {
            return Err(format!(
                "data unit size {} is not supported (only {UNIT})",
                self.data_unit_size
            ));
        }
        check_iterations(self.iterations)
    }

    /// Read and check the `crypt` file of the image in `dir`.
    pub fn load(dir: &Path) -> Result<CryptParams, EngineError> {
        let path = dir.join(CRYPT_FILE);
        let bad = |reason: String| EngineError::BadCryptParams {
            path: path.clone(),
            reason,
        };
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(bad(
                    "missing: the image is not encrypted, or it lost the file \
                     without which its data cannot be decrypted"
                        .into(),
                ))
            }
            Err(source) => {
                return Err(EngineError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let params: CryptParams =
            serde_json::from_slice(&text).map_err(|e| bad(format!("unreadable: {e}")))?;
        params.validate().map_err(bad)?;
        Ok(params)
    }

    /// Write them as the `crypt` file of `dir`, durably and atomically
    /// (temp file, fsync, rename, fsync of the directory). Replaces an
    /// existing file: for a clone's new directory, say.
    pub fn store(&self, dir: &Path) -> Result<(), EngineError> {
        let tmp = dir.join(CRYPT_TMP);
        let path = dir.join(CRYPT_FILE);
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| EngineError::Io { op, path, source }
        };
        let mut json = serde_json::to_vec(self).expect("params serialize");
        json.push(b'\n');
        let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&json).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))
    }
}

fn check_iterations(iterations: u32) -> Result<(), String> {
    if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
        return Err(format!(
            "{iterations} PBKDF2 iterations is outside {MIN_ITERATIONS} ..= {MAX_ITERATIONS}"
        ));
    }
    Ok(())
}

/// 64 bytes of XTS keys (data key, tweak key), then 32 of check key.
type DerivedKeys = Zeroizing<[u8; 96]>;

/// PBKDF2 to a master key, HKDF-Expand to the three keys (module doc).
fn derive_keys(secret: &Secret, salt: &[u8; 32], iterations: u32) -> DerivedKeys {
    let mut master = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(secret.bytes(), salt, iterations, &mut *master);
    let hkdf = Hkdf::<Sha256>::from_prk(&*master).expect("a 32-byte PRK is valid");
    let mut keys = Zeroizing::new([0u8; 96]);
    hkdf.expand(HKDF_INFO, &mut *keys)
        .expect("96 bytes is within HKDF-SHA256's output limit");
    keys
}

/// The MAC whose output is the key check value.
fn key_check_mac(keys: &DerivedKeys) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(&keys[64..]).expect("HMAC takes any key");
    mac.update(KCV_LABEL);
    mac
}

/// An AES block.
type Block = Array<u8, U16>;

/// Units whose first tweaks are computed together (one AES call), and so
/// the most one pass over the data covers: 128 KiB of 4 KiB units.
const TWEAK_BATCH: usize = 32;
/// Largest data unit, in AES blocks (the tweaks of one are on the stack).
const MAX_UNIT_BLOCKS: usize = UNIT as usize / 16;

/// XTS-AES-256 (IEEE 1619) over whole data units. Public for the benches;
/// the engine's keys never leave this module.
///
/// Per unit: the first tweak is the unit number (little-endian, 128 bits)
/// encrypted with the tweak key; each next block's is the previous one
/// times alpha in GF(2^128) (little-endian convention). Each block is
/// whitened with its tweak, en- or decrypted with the data key, whitened
/// again. A unit's tweaks are computed first, eight chains at once; the
/// blocks go through AES as many at once as the `aes` backend takes (64
/// with AVX-512 VAES, 30 with VAES, 8 with AES-NI). The `xts-mode` crate
/// called AES per block and stepped one tweak at a time: 50-100× slower.
/// Whole units only, so no ciphertext stealing.
///
/// Tweaks (and a padded last chunk) are left on the stack, not zeroized:
/// they reveal no key, and zeroizing would cost a fifth of a 4 KiB unit.
pub struct XtsAes256 {
    data: Aes256,
    tweak: Aes256,
}

impl XtsAes256 {
    /// From 64 bytes of key: data key, then tweak key (IEEE 1619's
    /// Key1 || Key2).
    pub fn new(key: &[u8; 64]) -> XtsAes256 {
        XtsAes256 {
            data: Aes256::new_from_slice(&key[..32]).expect("32-byte AES-256 key"),
            tweak: Aes256::new_from_slice(&key[32..]).expect("32-byte AES-256 key"),
        }
    }

    /// Encrypt `buf` (whole [`UNIT`]s) in place; the first unit's tweak is
    /// `first` little-endian (`plain64`), the next ones count up from it.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        self.crypt(None, buf, UNIT as usize, first, Direction::Encrypt);
    }

    /// [`XtsAes256::encrypt`] of `src` into `dst` (same length): no copy
    /// of the plaintext first.
    pub fn encrypt_to(&self, src: &[u8], dst: &mut [u8], first: u64) {
        self.crypt(Some(src), dst, UNIT as usize, first, Direction::Encrypt);
    }

    /// Undo [`XtsAes256::encrypt`].
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        self.crypt(None, buf, UNIT as usize, first, Direction::Decrypt);
    }

    /// With data units of `unit` bytes: the 512-byte IEEE 1619 vectors.
    #[cfg(test)]
    fn encrypt_sized(&self, buf: &mut [u8], unit: usize, first: u64) {
        self.crypt(None, buf, unit, first, Direction::Encrypt);
    }

    fn decrypt_sized(&self, buf: &mut [u8], unit: usize, first: u64) {
        self.crypt(None, buf, unit, first, Direction::Decrypt);
    }

    /// `dst` = XTS of `src` (of `dst` itself if `None`), units of `unit`
    /// bytes, the first numbered `first`.
    fn crypt(&self, src: Option<&[u8]>, dst: &mut [u8], unit: usize, first: u64, dir: Direction) {
        assert!(
            unit > 0 && unit % 16 == 0 && unit / 16 <= MAX_UNIT_BLOCKS && dst.len() % unit == 0,
            "XTS takes whole data units ({} bytes in units of {unit})",
            dst.len()
        );
        if let Some(src) = src {
            assert_eq!(src.len(), dst.len(), "XTS source and destination differ");
        }
        let unit_blocks = unit / 16;
        let group = TWEAK_BATCH * unit_blocks;
        let (dst, _) = Block::slice_as_chunks_mut(dst);
        let src = src.map(|s| Block::slice_as_chunks(s).0);
        let mut tweak_blocks = [Block::default(); TWEAK_BATCH];
        let mut firsts = [0u128; TWEAK_BATCH];
        for (g, dst) in dst.chunks_mut(group).enumerate() {
            let units = dst.len() / unit_blocks;
            // u128: the unit numbers of an IO near 2^64 go on counting.
            let number = u128::from(first) + (g * TWEAK_BATCH) as u128;
            for (i, block) in tweak_blocks[..units].iter_mut().enumerate() {
                *block = Array((number + i as u128).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut tweak_blocks[..units]);
            for (t, block) in firsts.iter_mut().zip(&tweak_blocks[..units]) {
                *t = u128::from_le_bytes(block.0);
            }
            let pass = Pass {
                src: src.map(|s| &s[g * group..][..dst.len()]),
                dst,
                firsts: &firsts[..units],
                unit_blocks,
            };
            match dir {
                Direction::Encrypt => self.data.encrypt_with_backend(pass),
                Direction::Decrypt => self.data.decrypt_with_backend(pass),
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// One XTS pass over whole units, given their first tweaks: run by the
/// `aes` backend (a closure in `cipher`'s terms), so that it can hand
/// chunks of the backend's parallel width to it.
struct Pass<'a> {
    src: Option<&'a [Block]>,
    dst: &'a mut [Block],
    firsts: &'a [u128],
    unit_blocks: usize,
}

impl Pass<'_> {
    /// `cipher` en- or decrypts `P` blocks in place, in parallel.
    #[inline(always)]
    fn run<P: ArraySize>(self, mut cipher: impl FnMut(&mut Array<Block, P>)) {
        let Pass {
            src,
            dst,
            firsts,
            unit_blocks,
        } = self;
        let mut tweaks = [0u128; MAX_UNIT_BLOCKS];
        let tweaks = &mut tweaks[..unit_blocks];
        let mut tail = Array::<Block, P>::default();
        for (u, (dst, &first)) in dst.chunks_mut(unit_blocks).zip(firsts).enumerate() {
            unit_tweaks(first, tweaks);
            let src = src.map(|s| &s[u * unit_blocks..][..unit_blocks]);
            for (c, (chunk, tweaks)) in dst
                .chunks_mut(P::USIZE)
                .zip(tweaks.chunks(P::USIZE))
                .enumerate()
            {
                let n = chunk.len();
                let src = src.map(|s| &s[c * P::USIZE..][..n]);
                if let Some(full) = Array::slice_as_mut_array(chunk) {
                    whiten(full, src, tweaks);
                    cipher(full);
                    whiten(full, None, tweaks);
                } else {
                    // A unit's last chunk, short when the backend's width
                    // does not divide the unit: padded, as AES is much
                    // slower one block at a time than a chunk in parallel.
                    whiten(&mut tail[..n], Some(src.unwrap_or(chunk)), tweaks);
                    cipher(&mut tail);
                    whiten(chunk, Some(&tail[..n]), tweaks);
                }
            }
        }
    }
}

/// The tweaks of a unit's blocks from the first (`first`): each the one
/// before times alpha. Eight chains, each stepping times alpha^8, held as
/// 64-bit halves: independent steps the compiler vectorizes, instead of one
/// 128-bit shift after the other (which costs more than the AES).
#[inline(always)]
fn unit_tweaks(first: u128, tweaks: &mut [u128]) {
    let mut t = first;
    let (mut lo, mut hi) = ([0u64; 8], [0u64; 8]);
    for i in 0..8 {
        lo[i] = t as u64;
        hi[i] = (t >> 64) as u64;
        t = mul_alpha(t);
    }
    let mut eights = tweaks.chunks_exact_mut(8);
    for eight in &mut eights {
        for i in 0..8 {
            eight[i] = u128::from(lo[i]) | (u128::from(hi[i]) << 64);
        }
        for i in 0..8 {
            let top = hi[i] >> 56;
            hi[i] = (hi[i] << 8) | (lo[i] >> 56);
            lo[i] = (lo[i] << 8) ^ top ^ (top << 1) ^ (top << 2) ^ (top << 7);
        }
    }
    for (i, tweak) in eights.into_remainder().iter_mut().enumerate() {
        *tweak = u128::from(lo[i]) | (u128::from(hi[i]) << 64);
    }
}

/// `t` times alpha (x) in GF(2^128) mod x^128 + x^7 + x^2 + x + 1, the
/// tweak as a little-endian number (IEEE 1619).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// `blocks[k]` = (`src[k]`, or `blocks[k]` itself) XOR `tweaks[k]`.
#[inline(always)]
fn whiten(blocks: &mut [Block], src: Option<&[Block]>, tweaks: &[u128]) {
    match src {
        Some(src) => {
            for ((block, s), t) in blocks.iter_mut().zip(src).zip(tweaks) {
                block.0 = (u128::from_le_bytes(s.0) ^ t).to_le_bytes();
            }
        }
        None => {
            for (block, t) in blocks.iter_mut().zip(tweaks) {
                block.0 = (u128::from_le_bytes(block.0) ^ t).to_le_bytes();
            }
        }
    }
}

impl BlockSizeUser for Pass<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for Pass<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        self.run::<B::ParBlocksSize>(|blocks| backend.encrypt_par_blocks_inplace(blocks));
    }
}

impl BlockCipherDecClosure for Pass<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        self.run::<B::ParBlocksSize>(|blocks| backend.decrypt_par_blocks_inplace(blocks));
    }
}

/// Decrypt `buf` in place, unit by unit, leaving all-zero units as they are
/// (the zero rule of the module doc); a run of nonzero units at once.
fn decrypt_units(xts: &XtsAes256, buf: &mut [u8], unit: usize, first: u64) {
    let units = buf.len() / unit;
    let mut i = 0;
    while i < units {
        if is_zero(&buf[i * unit..][..unit]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < units && !is_zero(&buf[i * unit..][..unit]) {
            i += 1;
        }
        let run = &mut buf[start * unit..i * unit];
        xts.decrypt_sized(run, unit, first + start as u64);
    }
}

/// An encrypted view of a [`ThinImage`], or of another engine (a
/// cluster's mirror) whose parameters are kept elsewhere. See the module doc.
pub struct CryptEngine {
    inner: Arc<dyn BlockEngine>,
    xts: XtsAes256,
    params: CryptParams,
}

impl std::fmt::Debug for CryptEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptEngine")
            .field("size", &self.inner.size())
            .field("cipher", &self.params.cipher)
            .field("iterations", &self.params.iterations)
            .finish_non_exhaustive()
    }
}

/// Read the `crypt` file in `dir` and derive the keys, checking them
/// against its key check value.
fn unlock(dir: &Path, secret: &Secret) -> Result<(CryptParams, DerivedKeys), EngineError> {
    let params = CryptParams::load(dir)?;
    let keys = unlock_params(&params, secret, dir)?;
    Ok((params, keys))
}

/// Derive the keys of `params` from `secret`, checking them against its key
/// check value (`from` names where the parameters are kept, for errors).
fn unlock_params(
    params: &CryptParams,
    secret: &Secret,
    from: &Path,
) -> Result<DerivedKeys, EngineError> {
    check_secret(secret)?;
    let keys = derive_keys(secret, &params.salt, params.iterations);
    // Constant time: the comparison reveals nothing of the MAC.
    if key_check_mac(&keys)
        .verify_slice(&params.key_check)
        .is_err()
    {
        return Err(EngineError::WrongKey {
            path: from.to_path_buf(),
        });
    }
    Ok(keys)
}

/// New parameters for `secret`: a random salt, its key check value.
fn fresh_params(
    secret: &Secret,
    iterations: u32,
) -> Result<(CryptParams, DerivedKeys), EngineError> {
    check_iterations(iterations).map_err(EngineError::InvalidParams)?;
    check_secret(secret)?;
    let mut salt = [0u8; 32];
    rand::rng().fill_bytes(&mut salt);
    let keys = derive_keys(secret, &salt, iterations);
    let params = CryptParams {
        version: FORMAT_VERSION,
        cipher: CIPHER.into(),
        kdf: KDF.into(),
        iterations,
        salt,
        data_unit_size: UNIT as u32,
        key_check: key_check_mac(&keys).finalize().into_bytes().into(),
    };
    Ok((params, keys))
}

impl CryptEngine {
    /// Encrypt the new, empty `image` in `dir` (its directory) with
    /// `secret`, [`DEFAULT_ITERATIONS`]: write the `crypt` file durably.
    pub fn create(
        image: Arc<ThinImage>,
        dir: &Path,
        secret: &Secret,
    ) -> Result<CryptEngine, EngineError> {
        Self::create_with_iterations(image, dir, secret, DEFAULT_ITERATIONS)
    }

    /// [`CryptEngine::create`] with a PBKDF2 iteration count of
    /// [`MIN_ITERATIONS`] ..= [`MAX_ITERATIONS`].
    pub fn create_with_iterations(
        image: Arc<ThinImage>,
        dir: &Path,
        secret: &Secret,
        iterations: u32,
    ) -> Result<CryptEngine, EngineError> {
        let path = dir.join(CRYPT_FILE);
        if path.try_exists().map_err(|source| EngineError::Io {
            op: "stat",
            path: path.clone(),
            source,
        })? {
            return Err(EngineError::InvalidParams(format!(
                "{} exists: the image is already encrypted",
                path.display()
            )));
        }
        // Data already there is plaintext, which we would read as ciphertext.
        if image.usage().allocated_blocks != 0 || image.is_passthrough() {
            return Err(EngineError::InvalidParams(
                "only a new, empty image can be encrypted: this one holds data".into(),
            ));
        }
        let (params, keys) = fresh_params(secret, iterations)?;
        params.store(dir)?;
        Ok(CryptEngine::with_keys(image, params, &keys))
    }

    fn with_keys(
        inner: Arc<dyn BlockEngine>,
        params: CryptParams,
        keys: &DerivedKeys,
    ) -> CryptEngine {
        CryptEngine {
            inner,
            xts: XtsAes256::new(keys[..64].try_into().expect("64 bytes of XTS keys")),
            params,
        }
    }

    /// Parameters for a new volume encrypted with `secret` whose parameters
    /// are kept apart from its data (a cluster's catalog): see
    /// [`CryptEngine::over`].
    pub fn new_params(secret: &Secret) -> Result<CryptParams, EngineError> {
        fresh_params(secret, DEFAULT_ITERATIONS).map(|(params, _)| params)
    }

    /// Encrypt whatever `inner` is (a cluster's mirror) with `params` kept
    /// elsewhere (`from` names where, for errors). A wrong key is
    /// [`EngineError::WrongKey`], before any IO.
    pub fn over(
        inner: Arc<dyn BlockEngine>,
        params: CryptParams,
        secret: &Secret,
        from: &Path,
    ) -> Result<CryptEngine, EngineError> {
        params
            .validate()
            .map_err(|reason| EngineError::BadCryptParams {
                path: from.to_path_buf(),
                reason,
            })?;
        let keys = unlock_params(&params, secret, from)?;
        Ok(CryptEngine::with_keys(inner, params, &keys))
    }

    /// Open the encrypted `image` in `dir` (its directory) with `secret`:
    /// read the `crypt` file and check the key. A wrong key is
    /// [`EngineError::WrongKey`], before any IO.
    pub fn open(
        image: Arc<ThinImage>,
        dir: &Path,
        secret: &Secret,
    ) -> Result<CryptEngine, EngineError> {
        let (params, keys) = unlock(dir, secret)?;
        Ok(CryptEngine::with_keys(image, params, &keys))
    }

    /// Whether `secret` is the key of the encrypted image in `dir`, without
    /// opening the image: [`EngineError::WrongKey`] if not.
    pub fn check_key(dir: &Path, secret: &Secret) -> Result<(), EngineError> {
        unlock(dir, secret).map(|_| ())
    }

    /// The volume's encryption parameters (the `crypt` file).
    pub fn params(&self) -> &CryptParams {
        &self.params
    }

    /// Whole units, within the device.
    fn check(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        if offset % UNIT != 0 || len % UNIT != 0 {
            return Err(EngineError::Misaligned {
                offset,
                len,
                align: UNIT,
            });
        }
        super::check_range(offset, len, self.inner.size())
    }
}

/// An encrypted volume's cipher, for its data moved apart from the volume
/// (a snapshot exported, a stream imported through a mirror).
pub struct UnitCipher {
    xts: XtsAes256,
}

impl UnitCipher {
    /// For the image in `dir` (its `crypt` file); a wrong key is
    /// [`EngineError::WrongKey`].
    pub fn open(dir: &Path, secret: &Secret) -> Result<UnitCipher, EngineError> {
        let (_, keys) = unlock(dir, secret)?;
        Ok(UnitCipher::with_keys(&keys))
    }

    /// For `params` kept elsewhere (a cluster's catalog; `from` names it).
    pub fn over(
        params: &CryptParams,
        secret: &Secret,
        from: &Path,
    ) -> Result<UnitCipher, EngineError> {
        let keys = unlock_params(params, secret, from)?;
        Ok(UnitCipher::with_keys(&keys))
    }

    fn with_keys(keys: &DerivedKeys) -> UnitCipher {
        UnitCipher {
            xts: XtsAes256::new(keys[..64].try_into().expect("64 bytes of XTS keys")),
        }
    }

    fn check(buf: &[u8], offset: u64) -> Result<(), EngineError> {
        if offset % UNIT != 0 || buf.len() as u64 % UNIT != 0 {
            return Err(EngineError::Misaligned {
                offset,
                len: buf.len() as u64,
                align: UNIT,
            });
        }
        Ok(())
    }

    /// `buf` as read from the device at `offset` (whole units), in place;
    /// never-written units (all zeros) stay zeros, as the volume reads them.
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        Self::check(buf, offset)?;
        decrypt_units(&self.xts, buf, UNIT as usize, offset / UNIT);
        Ok(())
    }

    /// `buf`, to be written to the device at `offset` (whole units), in place.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        Self::check(buf, offset)?;
        self.xts.encrypt(buf, offset / UNIT);
        Ok(())
    }
}

fn check_secret(secret: &Secret) -> Result<(), EngineError> {
    if secret.bytes().is_empty() {
        return Err(EngineError::InvalidParams("the secret is empty".into()));
    }
    Ok(())
}

impl BlockEngine for CryptEngine {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.check(offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)?;
        decrypt_units(&self.xts, buf, UNIT as usize, offset / UNIT);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        self.check(offset, buf.len() as u64)?;
        SCRATCH.with_borrow_mut(|scratch| {
            let mut at = offset;
            let need = buf.len().min(WRITE_CHUNK);
            if scratch.len() < need {
                scratch.resize(need, 0);
            }
            for chunk in buf.chunks(WRITE_CHUNK) {
                let out = &mut scratch[..chunk.len()];
                self.xts.encrypt_to(chunk, out, at / UNIT);
                self.inner.write_at(out, at)?;
                at += chunk.len() as u64;
            }
            Ok(())
        })
    }

    /// One chunk: encrypted here, handed on (the layer below is done with
    /// the ciphertext when it returns). Larger writes go synchronously.
    fn write_then(&self, buf: &[u8], offset: u64, done: super::WriteDone) {
        if buf.len() > WRITE_CHUNK {
            return done(self.write_at(buf, offset));
        }
        if let Err(e) = self.check(offset, buf.len() as u64) {
            return done(Err(e));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < buf.len() {
                scratch.resize(buf.len(), 0);
            }
            let out = &mut scratch[..buf.len()];
            self.xts.encrypt_to(buf, out, offset / UNIT);
            self.inner.write_then(out, offset, done)
        })
    }

    fn flush(&self) -> Result<(), EngineError> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        // Discarded units read back as zeros by the zero rule.
        self.check(offset, len)?;
        self.inner.discard(offset, len)
    }

    /// Never: the kernel would read and write ciphertext as plaintext.
    fn begin_passthrough(&self) -> Option<File> {
        None
    }

    fn io_parallelism(&self) -> usize {
        self.inner.io_parallelism()
    }
}

/// `[u8; 32]` as 64 lowercase hex digits in JSON.
mod hex32 {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let hex = String::deserialize(d)?;
        let digits = hex.as_bytes();
        let mut out = [0u8; 32];
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(D::Error::custom("expected 64 hex digits"));
        }
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).expect("ASCII hex digits");
            *byte = u8::from_str_radix(pair, 16).expect("checked hex digits");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pattern::pattern;
    use crate::engine::ThinParams;
    use std::path::PathBuf;
    use std::sync::Barrier;

    const MIB: u64 = 1 << 20;
    /// The lowest valid count: PBKDF2 dominates these tests' run time.
    const ITERS: u32 = MIN_ITERATIONS;
    const PASSPHRASE: &str = "correct horse battery staple";

    fn secret() -> Secret {
        Secret::new(PASSPHRASE)
    }

    fn new_image(dir: &Path, size: u64, block_size: u32) -> Arc<ThinImage> {
        Arc::new(ThinImage::create(dir, ThinParams { size, block_size }).unwrap())
    }

    /// A fresh encrypted image: (dir, engine).
    fn new_crypt(size: u64, block_size: u32) -> (tempfile::TempDir, CryptEngine) {
        let (dir, _, engine) = new_crypt_image(size, block_size);
        (dir, engine)
    }

    /// [`new_crypt`], and the image underneath (ciphertext).
    fn new_crypt_image(
        size: u64,
        block_size: u32,
    ) -> (tempfile::TempDir, Arc<ThinImage>, CryptEngine) {
        let dir = tempfile::tempdir().unwrap();
        let image = new_image(dir.path(), size, block_size);
        let engine =
            CryptEngine::create_with_iterations(image.clone(), dir.path(), &secret(), ITERS)
                .unwrap();
        (dir, image, engine)
    }

    /// Close the engine and its image (flushing), open both again.
    fn reopen(dir: &Path, engine: CryptEngine, secret: &Secret) -> CryptEngine {
        drop(engine);
        let image = Arc::new(ThinImage::open(dir).unwrap());
        CryptEngine::open(image, dir, secret).unwrap()
    }

    fn read_vec(engine: &dyn BlockEngine, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        engine.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Every file under `dir`, recursively, with its contents.
    fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(all_files(&path));
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
        out
    }

    /// IEEE 1619-2007 vector 10 (XTS-AES-256, 512-byte data unit, data
    /// unit sequence number 0xff), through the engine's own key split and
    /// tweak function: a big-endian tweak, swapped keys or another mode
    /// would all fail it.
    #[test]
    fn xts_aes_256_ieee_1619_vector_10() {
        let key = unhex(
            "2718281828459045235360287471352662497757247093699959574966967627
             3141592653589793238462643383279502884197169399375105820974944592",
        );
        let plaintext: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let ciphertext = unhex(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
             5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
             5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
             c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
             2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
             b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
             93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
             583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
             84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
             505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
             9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
             a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
             6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
             645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
             1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
             773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        );
        let xts = XtsAes256::new(key[..].try_into().unwrap());
        // Two units: the vector's is the second, so its tweak (0xff) comes
        // from the first unit's index plus one, as for a multi-unit IO.
        let mut buf = vec![0x5a; 512];
        buf.extend_from_slice(&plaintext);
        xts.encrypt_sized(&mut buf, 512, 0xfe);
        assert_eq!(hex(&buf[512..]), hex(&ciphertext));
        decrypt_units(&xts, &mut buf, 512, 0xfe);
        assert_eq!(buf[512..], plaintext[..]);
        assert!(buf[..512].iter().all(|&b| b == 0x5a));
    }

    /// The batched cipher against `xts-mode` (per-block reference): random
    /// data; units of 4096 and 512 bytes, and of 400 and 16 (blocks not a
    /// multiple of the eight tweak chains nor of the backend's width); IOs
    /// of 1 to 70 units (across the tweak batch of 32); unit numbers from 0
    /// to near 2^64; in place and out of place; and back.
    #[test]
    fn xts_matches_the_reference_implementation() {
        use aes::cipher::KeyInit;
        use rand::Rng;
        use xts_mode::{get_tweak_default, Xts128};
        let mut rng = rand::rng();
        let mut key = [0u8; 64];
        rng.fill_bytes(&mut key);
        let ours = XtsAes256::new(&key);
        let reference = Xts128::new(
            Aes256::new_from_slice(&key[..32]).unwrap(),
            Aes256::new_from_slice(&key[32..]).unwrap(),
        );
        let firsts = [0, 1, 2, 255, 0x1_0000_0000, u64::MAX - 80, u64::MAX - 3];
        for unit in [4096usize, 512, 400, 16] {
            for units in [1usize, 2, 3, 31, 32, 33, 64, 70] {
                for first in firsts {
                    let first = first.min(u64::MAX - units as u64 + 1);
                    let mut plain = vec![0u8; units * unit];
                    rng.fill_bytes(&mut plain);
                    let mut want = plain.clone();
                    reference.encrypt_area(&mut want, unit, u128::from(first), get_tweak_default);
                    let mut got = plain.clone();
                    ours.crypt(None, &mut got, unit, first, Direction::Encrypt);
                    let at = format!("unit {unit}, {units} units from {first}");
                    assert!(got == want, "encrypt: {at}");
                    let mut out = vec![0u8; plain.len()];
                    ours.crypt(Some(&plain), &mut out, unit, first, Direction::Encrypt);
                    assert!(out == want, "encrypt_to: {at}");
                    ours.decrypt_sized(&mut got, unit, first);
                    assert!(got == plain, "decrypt: {at}");
                }
            }
        }
        // The public 4 KiB API, one unit at a time or many at once.
        let mut plain = vec![0u8; 40 * 4096];
        rng.fill_bytes(&mut plain);
        let first = rng.random_range(0..1u64 << 40);
        let mut want = plain.clone();
        reference.encrypt_area(&mut want, 4096, u128::from(first), get_tweak_default);
        let mut out = vec![0u8; plain.len()];
        ours.encrypt_to(&plain, &mut out, first);
        assert!(out == want);
        for (i, unit) in plain.chunks_exact_mut(4096).enumerate() {
            ours.encrypt(unit, first + i as u64);
        }
        assert!(plain == want);
        ours.decrypt(&mut plain, first);
        ours.decrypt(&mut out, first);
        assert!(plain == out);
    }

    #[test]
    #[should_panic(expected = "whole data units")]
    fn xts_refuses_a_partial_unit() {
        XtsAes256::new(&[1; 64]).encrypt(&mut [0u8; 4096 + 16], 0);
    }

    #[test]
    fn round_trip_through_a_thin_image() {
        let (dir, image, engine) = new_crypt_image(64 * MIB, 32 << 10);
        let a = pattern(1, 4096);
        let b = pattern(2, 3 * MIB as usize); // more than one write chunk
        let c = pattern(3, 12 << 10);
        engine.write_at(&a, 0).unwrap();
        engine.write_at(&b, 5 * MIB).unwrap();
        engine.write_at(&c, 64 * MIB - (12 << 10)).unwrap();
        let check = |engine: &CryptEngine| {
            assert_eq!(read_vec(engine, 0, a.len()), a);
            assert_eq!(read_vec(engine, 5 * MIB, b.len()), b);
            assert_eq!(read_vec(engine, 64 * MIB - (12 << 10), c.len()), c);
            // A read spanning written and unwritten units.
            let mixed = read_vec(engine, 5 * MIB - 8192, 16384);
            assert!(mixed[..8192].iter().all(|&x| x == 0));
            assert_eq!(mixed[8192..], b[..8192]);
        };
        check(&engine);
        // The image holds ciphertext, not the plaintext.
        let mut raw = vec![0u8; 4096];
        image.read_at(&mut raw, 0).unwrap();
        drop(image);
        assert_ne!(raw, a);
        engine.flush().unwrap();
        let engine = reopen(dir.path(), engine, &secret());
        check(&engine);
        assert_eq!(engine.params().iterations, ITERS);
        assert_eq!(engine.size(), 64 * MIB);
    }

    #[test]
    fn snapshots_and_clones_of_an_encrypted_image_share_ciphertext() {
        // 32 KiB blocks: a 4 KiB write copies the block's other units
        // (ciphertext, tweaked by their logical offset, which a copy keeps).
        let (dir, image, engine) = new_crypt_image(4 * MIB, 32 << 10);
        let v1 = pattern(1, 256 << 10);
        engine.write_at(&v1, 0).unwrap();
        image.snapshot("s").unwrap();
        engine.write_at(&pattern(2, 4096), 8192).unwrap();
        // A clone: its own directory, the base's crypt file copied.
        let cdir = tempfile::tempdir().unwrap();
        let clone = ThinImage::create_clone(cdir.path(), dir.path(), "s").unwrap();
        CryptParams::load(dir.path())
            .unwrap()
            .store(cdir.path())
            .unwrap();
        let clone = CryptEngine::open(Arc::new(clone), cdir.path(), &secret()).unwrap();
        assert_eq!(read_vec(&clone, 0, v1.len()), v1);
        clone.write_at(&pattern(3, 4096), 40 << 10).unwrap();
        clone.discard(64 << 10, 4096).unwrap();
        let mut cv = v1.clone();
        cv[40 << 10..][..4096].copy_from_slice(&pattern(3, 4096));
        cv[64 << 10..][..4096].fill(0);
        assert_eq!(read_vec(&clone, 0, cv.len()), cv);
        let mut bv = v1.clone();
        bv[8192..][..4096].copy_from_slice(&pattern(2, 4096));
        assert_eq!(read_vec(&engine, 0, bv.len()), bv);
        let clone = reopen(cdir.path(), clone, &secret());
        assert_eq!(read_vec(&clone, 0, cv.len()), cv);
    }

    #[test]
    fn unwritten_and_discarded_units_read_zeros() {
        // 4 KiB blocks: unmapped is exactly unwritten. 32 KiB blocks: a
        // mapped block holds unwritten units, and discards of single units
        // zero them in place.
        for block_size in [4u32 << 10, 32 << 10] {
            let (dir, engine) = new_crypt(16 * MIB, block_size);
            assert!(read_vec(&engine, 0, 2 * MIB as usize)
                .iter()
                .all(|&b| b == 0));
            let one = pattern(7, 4096);
            engine.write_at(&one, 4096).unwrap();
            let around = read_vec(&engine, 0, 64 << 10);
            assert!(around[..4096].iter().all(|&b| b == 0), "bs {block_size}");
            assert_eq!(around[4096..8192], one[..], "bs {block_size}");
            assert!(around[8192..].iter().all(|&b| b == 0), "bs {block_size}");

            let big = pattern(8, MIB as usize);
            engine.write_at(&big, MIB).unwrap();
            engine.discard(4096, 4096).unwrap(); // part of a block
            engine.discard(MIB + 4096, 8192).unwrap(); // part of a block
            engine.discard(MIB + (256 << 10), 256 << 10).unwrap(); // whole blocks
            let check = |engine: &CryptEngine| {
                assert!(read_vec(engine, 0, 64 << 10).iter().all(|&b| b == 0));
                let back = read_vec(engine, MIB, MIB as usize);
                let mut want = big.clone();
                want[4096..12288].fill(0);
                want[256 << 10..512 << 10].fill(0);
                assert!(back == want, "bs {block_size}");
            };
            check(&engine);
            engine.flush().unwrap();
            check(&reopen(dir.path(), engine, &secret()));
        }
    }

    #[test]
    fn no_plaintext_or_secret_on_disk() {
        let marker = b"DUNNAGE-PLAINTEXT-MARKER-7f3a";
        let (dir, engine) = new_crypt(64 * MIB, 32 << 10);
        let unit: Vec<u8> = marker.iter().copied().cycle().take(4096).collect();
        let many: Vec<u8> = unit.iter().copied().cycle().take(MIB as usize).collect();
        for i in 0..8 {
            engine.write_at(&many, i * 7 * MIB).unwrap();
        }
        for i in 0..64 {
            engine.write_at(&unit, 60 * MIB + i * 4096).unwrap();
        }
        engine.flush().unwrap();
        let params = engine.params().clone();
        drop(engine);

        let keys = derive_keys(&secret(), &params.salt, params.iterations);
        let mut master = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(PASSPHRASE.as_bytes(), &params.salt, ITERS, &mut master);
        let files = all_files(dir.path());
        assert!(files
            .iter()
            .any(|(p, b)| p.ends_with("data") && b.len() as u64 >= 60 * MIB));
        for (path, bytes) in &files {
            let p = path.display();
            assert!(!contains(bytes, &marker[..16]), "plaintext in {p}");
            assert!(!contains(bytes, PASSPHRASE.as_bytes()), "passphrase in {p}");
        }
        let crypt = std::fs::read(dir.path().join(CRYPT_FILE)).unwrap();
        let text = String::from_utf8(crypt.clone()).unwrap();
        for key in [&master[..], &keys[..32], &keys[32..64], &keys[64..]] {
            assert!(!contains(&crypt, key));
            assert!(!text.contains(&hex(key)));
        }
        assert!(!text.contains(PASSPHRASE));
    }

    #[test]
    fn crypt_file_format() {
        let (dir, engine) = new_crypt(16 * MIB, 32 << 10);
        let text = std::fs::read_to_string(dir.path().join(CRYPT_FILE)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["cipher"], "aes-256-xts");
        assert_eq!(json["kdf"], "pbkdf2-hmac-sha256");
        assert_eq!(json["iterations"], ITERS);
        assert_eq!(json["data_unit_size"], 4096);
        assert_eq!(json["salt"], hex(&engine.params().salt));
        assert_eq!(json["key_check"].as_str().unwrap().len(), 64);
        assert_eq!(json.as_object().unwrap().len(), 7);
        assert!(!dir.path().join(CRYPT_TMP).exists());
        // A salt per volume.
        let (_dir2, other) = new_crypt(16 * MIB, 32 << 10);
        assert_ne!(other.params().salt, engine.params().salt);
        assert_ne!(other.params().key_check, engine.params().key_check);
    }

    #[test]
    fn wrong_key_is_refused_before_any_io() {
        let (dir, engine) = new_crypt(16 * MIB, 32 << 10);
        let data = pattern(9, 64 << 10);
        engine.write_at(&data, 0).unwrap();
        drop(engine);
        let before = all_files(dir.path());

        let image = Arc::new(ThinImage::open(dir.path()).unwrap());
        for wrong in [
            Secret::new("correct horse battery stapler"),
            Secret::new(vec![0u8]),
        ] {
            let err = CryptEngine::open(image.clone(), dir.path(), &wrong).unwrap_err();
            assert!(matches!(err, EngineError::WrongKey { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("key does not match"), "{msg}");
            assert!(msg.contains("secret it was created with"), "{msg}");
            assert_eq!(err.errno(), libc::EKEYREJECTED);
        }
        let empty = CryptEngine::open(image.clone(), dir.path(), &Secret::new("")).unwrap_err();
        assert!(matches!(empty, EngineError::InvalidParams(_)), "{empty:?}");
        drop(image);
        assert_eq!(
            all_files(dir.path()),
            before,
            "a refused open changed the image"
        );

        let image = Arc::new(ThinImage::open(dir.path()).unwrap());
        let engine = CryptEngine::open(image, dir.path(), &secret()).unwrap();
        assert_eq!(read_vec(&engine, 0, data.len()), data);
    }

    #[test]
    fn iterations_below_the_minimum_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = new_image(dir.path(), 16 * MIB, 32 << 10);
        for n in [0, 1000, MIN_ITERATIONS - 1, MAX_ITERATIONS + 1] {
            let err = CryptEngine::create_with_iterations(image.clone(), dir.path(), &secret(), n)
                .unwrap_err();
            assert!(matches!(err, EngineError::InvalidParams(_)), "{err:?}");
        }
        assert!(!dir.path().join(CRYPT_FILE).exists());

        // A crypt file lowered to 50 000 iterations is refused on open.
        let engine =
            CryptEngine::create_with_iterations(image.clone(), dir.path(), &secret(), ITERS)
                .unwrap();
        let mut weak = engine.params().clone();
        drop(engine);
        weak.iterations = 50_000;
        weak.store(dir.path()).unwrap();
        let err = CryptEngine::open(image, dir.path(), &secret()).unwrap_err();
        assert!(matches!(err, EngineError::BadCryptParams { .. }), "{err:?}");
        assert!(err.to_string().contains("50000 PBKDF2 iterations"), "{err}");
    }

    #[test]
    fn missing_or_damaged_crypt_file_is_refused() {
        let (dir, image, engine) = new_crypt_image(16 * MIB, 32 << 10);
        let good = std::fs::read_to_string(dir.path().join(CRYPT_FILE)).unwrap();
        drop(engine);
        let open = || CryptEngine::open(image.clone(), dir.path(), &secret()).unwrap_err();

        std::fs::remove_file(dir.path().join(CRYPT_FILE)).unwrap();
        let err = open();
        assert!(matches!(err, EngineError::BadCryptParams { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");

        let damaged = [
            "".to_string(),
            "{not json".to_string(),
            good.replace("aes-256-xts", "aes-128-xts"),
            good.replace("pbkdf2-hmac-sha256", "argon2id"),
            good.replace("4096", "512"),
            good.replace("\"version\":1", "\"version\":2"),
            good.replace("\"salt\":\"", "\"salt\":\"zz"),
            good.replace('}', ",\"extra\":1}"),
        ];
        for text in damaged {
            std::fs::write(dir.path().join(CRYPT_FILE), &text).unwrap();
            let err = open();
            assert!(
                matches!(err, EngineError::BadCryptParams { .. }),
                "{text}: {err:?}"
            );
        }

        // A second create never replaces the parameters of existing data.
        std::fs::write(dir.path().join(CRYPT_FILE), &good).unwrap();
        let err =
            CryptEngine::create_with_iterations(image, dir.path(), &secret(), ITERS).unwrap_err();
        assert!(err.to_string().contains("already encrypted"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CRYPT_FILE)).unwrap(),
            good
        );
    }

    #[test]
    fn only_an_empty_image_is_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let image = new_image(dir.path(), 16 * MIB, 32 << 10);
        image.write_at(&pattern(1, 4096), 0).unwrap();
        let err =
            CryptEngine::create_with_iterations(image, dir.path(), &secret(), ITERS).unwrap_err();
        assert!(err.to_string().contains("empty image"), "{err}");
        assert!(!dir.path().join(CRYPT_FILE).exists());
    }

    #[test]
    fn misaligned_io_is_refused() {
        let (_dir, image, engine) = new_crypt_image(16 * MIB, 32 << 10);
        let mut buf = vec![0u8; 8192];
        let misaligned = |r: Result<(), EngineError>| match r {
            Err(e @ EngineError::Misaligned { .. }) => {
                assert_eq!(e.errno(), libc::EINVAL);
                assert!(e.to_string().contains("4096"), "{e}");
            }
            other => panic!("{other:?}"),
        };
        misaligned(engine.read_at(&mut buf, 512));
        misaligned(engine.read_at(&mut buf[..512], 0));
        misaligned(engine.read_at(&mut buf[..4097], 4096));
        misaligned(engine.write_at(&buf, 1));
        misaligned(engine.write_at(&buf[..4095], 0));
        misaligned(engine.discard(4096, 100));
        misaligned(engine.discard(2048, 4096));
        // Nothing was written by the refused writes.
        assert_eq!(image.usage().allocated_blocks, 0);
        assert!(matches!(
            engine.write_at(&buf, 16 * MIB - 4096),
            Err(EngineError::OutOfRange { .. })
        ));
        assert!(engine.begin_passthrough().is_none());
        assert!(!image.is_passthrough());
    }

    #[test]
    fn debug_shows_no_secret() {
        let s = secret();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{s:#?}"), "Secret(<redacted>)");
        let (_dir, engine) = new_crypt(16 * MIB, 32 << 10);
        let shown = format!("{engine:?}");
        assert!(!shown.contains(PASSPHRASE), "{shown}");
        let keys = derive_keys(&s, &engine.params().salt, ITERS);
        for key in [&keys[..32], &keys[32..64], &keys[64..]] {
            assert!(!shown.contains(&hex(key)), "{shown}");
        }
    }

    #[test]
    fn concurrent_writers_on_different_units() {
        // Units interleaved across threads, so threads share thin blocks
        // (8 units per 32 KiB block) and race on their first allocation.
        const THREADS: u64 = 4;
        const UNITS: u64 = 512;
        const ROUNDS: u64 = 4;
        let (dir, engine) = new_crypt(16 * MIB, 32 << 10);
        let engine = Arc::new(engine);
        let seed = |unit: u64, round: u64| unit * 1000 + round + 1;
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let engine = engine.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for round in 0..ROUNDS {
                        for unit in (t..UNITS).step_by(THREADS as usize) {
                            let data = pattern(seed(unit, round), 4096);
                            engine.write_at(&data, unit * UNIT).unwrap();
                            assert_eq!(read_vec(&*engine, unit * UNIT, 4096), data);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let engine = Arc::into_inner(engine).unwrap();
        let check = |engine: &CryptEngine| {
            let all = read_vec(engine, 0, (UNITS * UNIT) as usize);
            for (unit, got) in all.chunks_exact(UNIT as usize).enumerate() {
                assert!(
                    got == pattern(seed(unit as u64, ROUNDS - 1), 4096),
                    "unit {unit}"
                );
            }
        };
        check(&engine);
        engine.flush().unwrap();
        check(&reopen(dir.path(), engine, &secret()));
    }
}
