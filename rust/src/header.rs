//! The 512-byte h5ckpt header (docs/format.md): encoding and strict parsing.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// `"\x89H5C\r\n\x1a\n"`.
pub const MAGIC: [u8; 8] = *b"\x89H5C\r\n\x1a\n";
/// The signature at the start of a plain HDF5 file (no user block).
pub const HDF5_SIGNATURE: [u8; 8] = *b"\x89HDF\r\n\x1a\n";
/// Size of the header, which is also the HDF5 user block size.
pub const HEADER_SIZE: usize = 512;
/// Offset of the payload (the HDF5 superblock).
pub const PAYLOAD_OFFSET: u64 = HEADER_SIZE as u64;
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 0;
pub const MIN_CHUNK_LOG2: u32 = 12;
pub const MAX_CHUNK_LOG2: u32 = 30;
pub const DEFAULT_CHUNK_LOG2: u32 = 20;
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << DEFAULT_CHUNK_LOG2;
/// Flag bit 0: an HMAC tag is present.
pub const FLAG_HMAC: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_HMAC;

/// Bytes covered by the HMAC tag: `header[0:104]`.
pub const HMAC_COVERED: usize = 104;
/// Bytes covered by the header digest: `header[0:480]`.
pub const DIGEST_COVERED: usize = 480;

mod off {
    pub const MAJOR: usize = 8;
    pub const MINOR: usize = 10;
    pub const HEADER_SIZE: usize = 12;
    pub const PAYLOAD_OFFSET: usize = 16;
    pub const PAYLOAD_LENGTH: usize = 24;
    pub const CHUNK_LOG2: usize = 32;
    pub const FLAGS: usize = 36;
    pub const CHUNK_COUNT: usize = 40;
    pub const BATCH_IDX: usize = 48;
    pub const LOSS: usize = 56;
    pub const TIMESTAMP: usize = 64;
    pub const PAYLOAD_DIGEST: usize = 72;
    pub const HMAC_TAG: usize = 104;
    pub const HEADER_DIGEST: usize = 480;
}

/// A parsed, self-consistent header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub format_major: u16,
    pub format_minor: u16,
    pub payload_offset: u64,
    pub payload_length: u64,
    pub chunk_log2: u32,
    pub flags: u32,
    pub chunk_count: u64,
    pub batch_idx: u64,
    pub loss: f64,
    pub timestamp: f64,
    pub payload_digest: [u8; 32],
    pub hmac_tag: [u8; 32],
    pub header_digest: [u8; 32],
}

impl Header {
    /// Chunk size `C` in bytes.
    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunk_log2
    }

    /// Whether flag bit 0 (HMAC tag present) is set.
    pub fn keyed(&self) -> bool {
        self.flags & FLAG_HMAC != 0
    }

    /// The file length the header announces, `payload_offset + payload_length`, or
    /// `None` where that sum overflows (never for a header that parsed).
    pub fn file_length(&self) -> Option<u64> {
        self.payload_offset.checked_add(self.payload_length)
    }
}

/// What a writer puts into a new header; the rest is derived.
#[derive(Clone, Debug)]
pub struct HeaderFields {
    pub payload_length: u64,
    pub chunk_log2: u32,
    pub batch_idx: u64,
    pub loss: f64,
    pub timestamp: f64,
    pub payload_digest: [u8; 32],
}

/// Number of chunks of `2**chunk_log2` bytes in `len` bytes.
pub fn chunk_count(len: u64, chunk_log2: u32) -> u64 {
    len.div_ceil(1u64 << chunk_log2)
}

/// Checks a chunk size: a power of two from 4 KiB to 1 GiB. Returns its log2.
pub fn chunk_log2_of(chunk_size: u64) -> Result<u32> {
    if chunk_size.is_power_of_two() {
        let log2 = chunk_size.trailing_zeros();
        if (MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&log2) {
            return Ok(log2);
        }
    }
    Err(Error::invalid(format!(
        "chunk_size must be a power of two from {} to {} bytes, got {chunk_size}",
        1u64 << MIN_CHUNK_LOG2,
        1u64 << MAX_CHUNK_LOG2
    )))
}

/// Checks a chunk size given as its log2 (a writer's choice, so an invalid argument).
pub fn check_chunk_log2(chunk_log2: u32) -> Result<()> {
    if (MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&chunk_log2) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "chunk_log2 must be in {MIN_CHUNK_LOG2}..={MAX_CHUNK_LOG2}, got {chunk_log2}"
        )))
    }
}

/// Checks an HMAC key (non-empty) and returns the MAC ready for input.
fn new_mac(key: &[u8]) -> Result<Hmac<Sha256>> {
    if key.is_empty() {
        return Err(Error::invalid("hmac_key must not be empty"));
    }
    Hmac::<Sha256>::new_from_slice(key).map_err(|e| Error::invalid(format!("hmac_key: {e}")))
}

/// Rejects an empty key.
pub fn check_key(key: Option<&[u8]>) -> Result<()> {
    match key {
        Some(k) => new_mac(k).map(|_| ()),
        None => Ok(()),
    }
}

/// `HMAC-SHA256(key, header[0:104])`.
pub fn hmac_tag(key: &[u8], header: &[u8; HEADER_SIZE]) -> Result<[u8; 32]> {
    let mut mac = new_mac(key)?;
    mac.update(&header[..HMAC_COVERED]);
    Ok(mac.finalize().into_bytes().into())
}

/// Checks the tag of a keyed header in constant time. `path` is only for messages.
pub fn check_hmac(
    key: &[u8],
    header: &[u8; HEADER_SIZE],
    parsed: &Header,
    path: &std::path::Path,
) -> Result<()> {
    if !parsed.keyed() {
        return Err(Error::authentication(
            path,
            "no HMAC tag (the file was written without a key)",
        ));
    }
    let mut mac = new_mac(key)?;
    mac.update(&header[..HMAC_COVERED]);
    mac.verify_slice(&header[off::HMAC_TAG..off::HMAC_TAG + 32])
        .map_err(|_| {
            Error::authentication(
                path,
                "HMAC tag mismatch (wrong key, or the file was altered)",
            )
        })
}

/// Encodes a header. With a key, sets flag bit 0 and stores the HMAC tag.
pub fn encode(fields: &HeaderFields, key: Option<&[u8]>) -> Result<[u8; HEADER_SIZE]> {
    check_chunk_log2(fields.chunk_log2)?;
    if PAYLOAD_OFFSET.checked_add(fields.payload_length).is_none() {
        return Err(Error::invalid("payload_length too large"));
    }
    let mut h = [0u8; HEADER_SIZE];
    let flags = if key.is_some() { FLAG_HMAC } else { 0 };
    h[..8].copy_from_slice(&MAGIC);
    put(&mut h, off::MAJOR, &FORMAT_MAJOR.to_le_bytes());
    put(&mut h, off::MINOR, &FORMAT_MINOR.to_le_bytes());
    put(
        &mut h,
        off::HEADER_SIZE,
        &(HEADER_SIZE as u32).to_le_bytes(),
    );
    put(&mut h, off::PAYLOAD_OFFSET, &PAYLOAD_OFFSET.to_le_bytes());
    put(
        &mut h,
        off::PAYLOAD_LENGTH,
        &fields.payload_length.to_le_bytes(),
    );
    put(&mut h, off::CHUNK_LOG2, &fields.chunk_log2.to_le_bytes());
    put(&mut h, off::FLAGS, &flags.to_le_bytes());
    let n = chunk_count(fields.payload_length, fields.chunk_log2);
    put(&mut h, off::CHUNK_COUNT, &n.to_le_bytes());
    put(&mut h, off::BATCH_IDX, &fields.batch_idx.to_le_bytes());
    put(&mut h, off::LOSS, &fields.loss.to_le_bytes());
    put(&mut h, off::TIMESTAMP, &fields.timestamp.to_le_bytes());
    put(&mut h, off::PAYLOAD_DIGEST, &fields.payload_digest);
    if let Some(key) = key {
        let tag = hmac_tag(key, &h)?;
        put(&mut h, off::HMAC_TAG, &tag);
    }
    let digest: [u8; 32] = Sha256::digest(&h[..DIGEST_COVERED]).into();
    put(&mut h, off::HEADER_DIGEST, &digest);
    Ok(h)
}

fn put(h: &mut [u8; HEADER_SIZE], at: usize, bytes: &[u8]) {
    h[at..at + bytes.len()].copy_from_slice(bytes);
}

fn get<const N: usize>(h: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&h[at..at + N]);
    out
}

/// Parses and checks a header: the first 512 bytes of `data`.
///
/// Checks, in this order: the magic, the major version (a newer major gives
/// [`Error::Version`] whatever the other bytes hold), the length, the header
/// digest, then every field rule of docs/format.md. Errors carry an empty path;
/// callers that know the file add it with [`Error::with_path`]. Never panics.
pub fn parse(data: &[u8]) -> Result<Header> {
    if data.len() < MAGIC.len() || data[..8] != MAGIC {
        return Err(Error::corrupt("", "not an h5ckpt file (bad magic)"));
    }
    if data.len() >= off::MINOR + 2 {
        let major = u16::from_le_bytes(get(data, off::MAJOR));
        let minor = u16::from_le_bytes(get(data, off::MINOR));
        if major > FORMAT_MAJOR {
            return Err(Error::Version {
                path: Default::default(),
                major,
                minor,
                supported: FORMAT_MAJOR,
            });
        }
    }
    if data.len() < HEADER_SIZE {
        return Err(Error::corrupt(
            "",
            format!(
                "truncated header: {} bytes, expected {HEADER_SIZE}",
                data.len()
            ),
        ));
    }
    let h = &data[..HEADER_SIZE];
    let digest: [u8; 32] = Sha256::digest(&h[..DIGEST_COVERED]).into();
    let stored: [u8; 32] = get(h, off::HEADER_DIGEST);
    if digest != stored {
        return Err(Error::corrupt(
            "",
            "header digest mismatch (header changed or corrupted)",
        ));
    }
    let header = Header {
        format_major: u16::from_le_bytes(get(h, off::MAJOR)),
        format_minor: u16::from_le_bytes(get(h, off::MINOR)),
        payload_offset: u64::from_le_bytes(get(h, off::PAYLOAD_OFFSET)),
        payload_length: u64::from_le_bytes(get(h, off::PAYLOAD_LENGTH)),
        chunk_log2: u32::from_le_bytes(get(h, off::CHUNK_LOG2)),
        flags: u32::from_le_bytes(get(h, off::FLAGS)),
        chunk_count: u64::from_le_bytes(get(h, off::CHUNK_COUNT)),
        batch_idx: u64::from_le_bytes(get(h, off::BATCH_IDX)),
        loss: f64::from_le_bytes(get(h, off::LOSS)),
        timestamp: f64::from_le_bytes(get(h, off::TIMESTAMP)),
        payload_digest: get(h, off::PAYLOAD_DIGEST),
        hmac_tag: get(h, off::HMAC_TAG),
        header_digest: stored,
    };
    let bad = |reason: String| Err(Error::corrupt("", reason));
    if header.format_major != FORMAT_MAJOR {
        return bad(format!(
            "unsupported format major version {}",
            header.format_major
        ));
    }
    let header_size = u32::from_le_bytes(get(h, off::HEADER_SIZE));
    if header_size as usize != HEADER_SIZE {
        return bad(format!(
            "header_size is {header_size}, expected {HEADER_SIZE}"
        ));
    }
    if header.payload_offset != PAYLOAD_OFFSET {
        return bad(format!(
            "payload_offset is {}, expected {PAYLOAD_OFFSET}",
            header.payload_offset
        ));
    }
    if header.file_length().is_none() {
        return bad(format!(
            "payload_length {} is out of range",
            header.payload_length
        ));
    }
    if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&header.chunk_log2) {
        return bad(format!(
            "chunk_log2 is {}, expected {MIN_CHUNK_LOG2} to {MAX_CHUNK_LOG2}",
            header.chunk_log2
        ));
    }
    if header.flags & !KNOWN_FLAGS != 0 {
        return bad(format!("unknown flag bits set: {:#x}", header.flags));
    }
    let n = chunk_count(header.payload_length, header.chunk_log2);
    if header.chunk_count != n {
        return bad(format!(
            "chunk_count is {}, expected {n} for payload_length {}",
            header.chunk_count, header.payload_length
        ));
    }
    if !header.keyed() && header.hmac_tag != [0u8; 32] {
        return bad("HMAC tag present but flag bit 0 is clear".to_string());
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields() -> HeaderFields {
        HeaderFields {
            payload_length: 5 * 4096 + 3,
            chunk_log2: 12,
            batch_idx: 42,
            loss: 0.25,
            timestamp: 1_700_000_000.5,
            payload_digest: [7u8; 32],
        }
    }

    /// Rewrites a field and re-seals the header digest, so that only the field
    /// rule under test can reject it.
    fn reseal(mut h: [u8; HEADER_SIZE], at: usize, bytes: &[u8]) -> [u8; HEADER_SIZE] {
        put(&mut h, at, bytes);
        let d: [u8; 32] = Sha256::digest(&h[..DIGEST_COVERED]).into();
        put(&mut h, off::HEADER_DIGEST, &d);
        h
    }

    fn corrupt_reason(data: &[u8]) -> String {
        match parse(data) {
            Err(Error::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn roundtrip_unkeyed() {
        let h = encode(&fields(), None).unwrap();
        let p = parse(&h).unwrap();
        assert_eq!(p.payload_length, 5 * 4096 + 3);
        assert_eq!(p.chunk_count, 6);
        assert_eq!(p.chunk_size(), 4096);
        assert_eq!(p.batch_idx, 42);
        assert_eq!(p.loss, 0.25);
        assert_eq!(p.timestamp, 1_700_000_000.5);
        assert_eq!(p.payload_digest, [7u8; 32]);
        assert!(!p.keyed());
        assert_eq!(p.hmac_tag, [0u8; 32]);
        assert_eq!(p.file_length(), Some(512 + 5 * 4096 + 3));
        assert!(h[136..480].iter().all(|&b| b == 0));
    }

    #[test]
    fn roundtrip_keyed_and_hmac() {
        let h = encode(&fields(), Some(b"secret")).unwrap();
        let p = parse(&h).unwrap();
        assert!(p.keyed());
        assert_eq!(p.hmac_tag, hmac_tag(b"secret", &h).unwrap());
        let path = std::path::Path::new("/x.h5");
        check_hmac(b"secret", &h, &p, path).unwrap();
        assert!(matches!(
            check_hmac(b"other", &h, &p, path),
            Err(Error::Authentication { .. })
        ));
        let u = encode(&fields(), None).unwrap();
        let pu = parse(&u).unwrap();
        assert!(matches!(
            check_hmac(b"secret", &u, &pu, path),
            Err(Error::Authentication { .. })
        ));
        assert!(matches!(
            encode(&fields(), Some(b"")),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn nan_and_inf_loss_roundtrip() {
        for loss in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut f = fields();
            f.loss = loss;
            let p = parse(&encode(&f, None).unwrap()).unwrap();
            assert_eq!(p.loss.to_bits(), loss.to_bits());
        }
    }

    #[test]
    fn empty_payload() {
        let mut f = fields();
        f.payload_length = 0;
        let p = parse(&encode(&f, None).unwrap()).unwrap();
        assert_eq!(p.chunk_count, 0);
    }

    #[test]
    fn rejects_each_rule() {
        let h = encode(&fields(), None).unwrap();
        assert!(corrupt_reason(&h[..511]).contains("truncated"));
        assert!(corrupt_reason(&h[..3]).contains("magic"));
        assert!(corrupt_reason(b"").contains("magic"));
        let mut m = h;
        m[0] = 0;
        assert!(corrupt_reason(&m).contains("magic"));
        let mut m = h;
        m[200] ^= 1;
        assert!(corrupt_reason(&m).contains("header digest"));
        let mut m = h;
        m[off::HEADER_DIGEST] ^= 1;
        assert!(corrupt_reason(&m).contains("header digest"));
        assert!(corrupt_reason(&reseal(h, off::MAJOR, &0u16.to_le_bytes())).contains("major"));
        assert!(
            corrupt_reason(&reseal(h, off::HEADER_SIZE, &1024u32.to_le_bytes()))
                .contains("header_size")
        );
        assert!(
            corrupt_reason(&reseal(h, off::PAYLOAD_OFFSET, &1024u64.to_le_bytes()))
                .contains("payload_offset")
        );
        for log2 in [0u32, 11, 31, u32::MAX] {
            assert!(
                corrupt_reason(&reseal(h, off::CHUNK_LOG2, &log2.to_le_bytes()))
                    .contains("chunk_log2")
            );
        }
        assert!(corrupt_reason(&reseal(h, off::FLAGS, &2u32.to_le_bytes())).contains("flag bits"));
        assert!(
            corrupt_reason(&reseal(h, off::CHUNK_COUNT, &5u64.to_le_bytes()))
                .contains("chunk_count")
        );
        assert!(
            corrupt_reason(&reseal(h, off::PAYLOAD_LENGTH, &u64::MAX.to_le_bytes()))
                .contains("payload_length")
        );
        assert!(corrupt_reason(&reseal(h, off::HMAC_TAG, &[1u8; 32])).contains("HMAC tag"));
        // Minor versions and reserved bytes are accepted.
        assert_eq!(
            parse(&reseal(h, off::MINOR, &7u16.to_le_bytes()))
                .unwrap()
                .format_minor,
            7
        );
        assert!(parse(&reseal(h, 300, &[9u8; 4])).is_ok());
        // Extra bytes after the header are ignored.
        let mut long = h.to_vec();
        long.extend_from_slice(b"payload");
        assert!(parse(&long).is_ok());
    }

    #[test]
    fn newer_major_is_a_version_error_whatever_else() {
        let mut h = [0xffu8; HEADER_SIZE];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&2u16.to_le_bytes());
        h[10..12].copy_from_slice(&3u16.to_le_bytes());
        let e = parse(&h).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Version {
                    major: 2,
                    minor: 3,
                    supported: FORMAT_MAJOR,
                    ..
                }
            ),
            "{e:?}"
        );
        let message = e.to_string();
        assert!(
            message.ends_with("this reader knows only major version 1"),
            "{message}"
        );
        // Also when truncated right after the version.
        assert!(matches!(parse(&h[..12]), Err(Error::Version { .. })));
    }

    #[test]
    fn lengths_beyond_the_largest_offset_are_refused() {
        let mut f = fields();
        f.payload_length = u64::MAX - PAYLOAD_OFFSET;
        let p = parse(&encode(&f, None).unwrap()).unwrap();
        assert_eq!(p.file_length(), Some(u64::MAX));
        f.payload_length += 1;
        assert!(matches!(encode(&f, None), Err(Error::InvalidArgument(_))));
        // A header made by hand rather than parsed.
        let mut h = p;
        h.payload_length = u64::MAX;
        assert_eq!(h.file_length(), None);
        let e = crate::verify::check_length(&h, u64::MAX, std::path::Path::new("/x.h5"));
        assert!(
            matches!(&e, Err(Error::Corrupt { reason, .. }) if reason.contains("out of range")),
            "{e:?}"
        );
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_log2_of(4096).unwrap(), 12);
        assert_eq!(chunk_log2_of(1 << 20).unwrap(), 20);
        assert_eq!(chunk_log2_of(1 << 30).unwrap(), 30);
        for bad in [0u64, 1, 2048, 4095, 4097, 1 << 31, u64::MAX] {
            assert!(chunk_log2_of(bad).is_err(), "{bad}");
        }
        for log2 in [MIN_CHUNK_LOG2, DEFAULT_CHUNK_LOG2, MAX_CHUNK_LOG2] {
            assert!(check_chunk_log2(log2).is_ok());
        }
        for log2 in [0, MIN_CHUNK_LOG2 - 1, MAX_CHUNK_LOG2 + 1, 64, u32::MAX] {
            assert!(matches!(
                check_chunk_log2(log2),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert_eq!(chunk_count(0, 12), 0);
        assert_eq!(chunk_count(1, 12), 1);
        assert_eq!(chunk_count(4096, 12), 1);
        assert_eq!(chunk_count(4097, 12), 2);
        assert_eq!(
            chunk_count(u64::MAX - 512, 30),
            (u64::MAX - 512).div_ceil(1 << 30)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&data);
        }

        #[test]
        fn parse_never_panics_with_magic(
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut data = MAGIC.to_vec();
            data.extend_from_slice(&tail);
            let _ = parse(&data);
        }

        #[test]
        fn roundtrip_any_fields(
            payload_length in 0u64..(u64::MAX - 512),
            chunk_log2 in MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2,
            batch_idx in any::<u64>(),
            loss in any::<f64>(),
            timestamp in any::<f64>(),
            digest in any::<[u8; 32]>(),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..100)),
        ) {
            let f = HeaderFields { payload_length, chunk_log2, batch_idx, loss, timestamp, payload_digest: digest };
            let h = encode(&f, key.as_deref()).unwrap();
            let p = parse(&h).unwrap();
            prop_assert_eq!(p.payload_length, payload_length);
            prop_assert_eq!(p.chunk_log2, chunk_log2);
            prop_assert_eq!(p.batch_idx, batch_idx);
            prop_assert_eq!(p.loss.to_bits(), loss.to_bits());
            prop_assert_eq!(p.timestamp.to_bits(), timestamp.to_bits());
            prop_assert_eq!(p.payload_digest, digest);
            prop_assert_eq!(p.keyed(), key.is_some());
            if let Some(k) = &key {
                prop_assert!(check_hmac(k, &h, &p, std::path::Path::new("x")).is_ok());
            }
        }

        #[test]
        fn any_single_byte_change_is_detected(
            at in 0usize..HEADER_SIZE,
            xor in 1u8..=255,
        ) {
            let mut h = encode(&fields(), None).unwrap();
            h[at] ^= xor;
            prop_assert!(parse(&h).is_err());
        }
    }

    /// Field offsets and widths a fuzz mutation aims at.
    const FIELDS: [(usize, usize); 11] = [
        (off::MAJOR, 2),
        (off::MINOR, 2),
        (off::HEADER_SIZE, 4),
        (off::PAYLOAD_OFFSET, 8),
        (off::PAYLOAD_LENGTH, 8),
        (off::CHUNK_LOG2, 4),
        (off::FLAGS, 4),
        (off::CHUNK_COUNT, 8),
        (off::BATCH_IDX, 8),
        (off::LOSS, 8),
        (off::TIMESTAMP, 8),
    ];

    /// Values at and around every boundary the parser checks, plus anything.
    fn edge_value() -> impl Strategy<Value = u64> {
        prop_oneof![
            prop::sample::select(vec![
                0u64,
                1,
                2,
                3,
                11,
                12,
                20,
                30,
                31,
                32,
                63,
                64,
                511,
                512,
                513,
                1024,
                4096,
                u64::from(u16::MAX),
                u64::from(u32::MAX),
                1 << 63,
                u64::MAX - 512,
                u64::MAX - 511,
                u64::MAX - 1,
                u64::MAX,
            ]),
            any::<u64>(),
        ]
    }

    /// Cases of the fuzz run: `H5CKPT_FUZZ_CASES` (default 10,000), bounded so that
    /// it fits in every `cargo test`; a soak can raise it.
    fn fuzz_config() -> ProptestConfig {
        let cases = std::env::var("H5CKPT_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        ProptestConfig {
            cases,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        /// Fuzz-style: start from a VALID header, rewrite fields with edge values and
        /// random bytes, re-seal the header digest (usually) so that the mutation
        /// reaches the field checks, then parse. Never panics, and whatever parses
        /// obeys every rule of docs/format.md.
        #[test]
        fn fuzz_mutated_valid_headers(
            payload_length in prop_oneof![0u64..(1 << 40), edge_value()],
            chunk_log2 in MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2,
            keyed in any::<bool>(),
            field_edits in proptest::collection::vec((0usize..FIELDS.len(), edge_value()), 0..4),
            byte_edits in proptest::collection::vec((0usize..HEADER_SIZE, any::<u8>()), 0..4),
            reseal_digest in proptest::bool::weighted(0.9),
            file_len in edge_value(),
        ) {
            let f = HeaderFields {
                payload_length: payload_length.min(u64::MAX - PAYLOAD_OFFSET),
                chunk_log2,
                batch_idx: 7,
                loss: 0.5,
                timestamp: 1.0,
                payload_digest: [3u8; 32],
            };
            let key: Option<&[u8]> = if keyed { Some(b"key") } else { None };
            let mut h = encode(&f, key).unwrap();
            for (field, value) in field_edits {
                let (at, width) = FIELDS[field];
                h[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
            for (at, value) in byte_edits {
                h[at] = value;
            }
            if reseal_digest {
                let d: [u8; 32] = Sha256::digest(&h[..DIGEST_COVERED]).into();
                put(&mut h, off::HEADER_DIGEST, &d);
            }
            let Ok(p) = parse(&h) else { return Ok(()) };
            prop_assert_eq!(&h[..8], &MAGIC[..]);
            prop_assert_eq!(p.format_major, FORMAT_MAJOR);
            prop_assert_eq!(u32::from_le_bytes(get(&h, off::HEADER_SIZE)), HEADER_SIZE as u32);
            prop_assert_eq!(p.payload_offset, PAYLOAD_OFFSET);
            prop_assert!((MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&p.chunk_log2));
            prop_assert_eq!(p.flags & !KNOWN_FLAGS, 0);
            prop_assert_eq!(p.chunk_count, chunk_count(p.payload_length, p.chunk_log2));
            prop_assert!(p.payload_length <= u64::MAX - PAYLOAD_OFFSET);
            prop_assert!(p.keyed() || p.hmac_tag == [0u8; 32]);
            let path = std::path::Path::new("fuzz.h5");
            // The length check and the HMAC check take any header that parsed.
            let length_ok = crate::verify::check_length(&p, file_len, path).is_ok();
            prop_assert_eq!(length_ok, Some(file_len) == p.file_length());
            let _ = check_hmac(b"key", &h, &p, path);
        }
    }
}
