//! The payload tree digest of docs/format.md:
//!
//! ```text
//! d_i  = SHA-256(chunk_i)
//! root = SHA-256(u64le(C) || u64le(n) || d_0 || ... || d_{n-1})
//! ```
//!
//! Chunk digests are computed in parallel with rayon, over memory or over a region
//! of a file (positional reads). Sealing a checkpoint, which hashes what it writes,
//! is in `finalize`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One SHA-256 digest.
pub type Hash = [u8; 32];

/// SHA-256 of one byte string.
pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The root over the chunk digests.
pub fn root(chunk_log2: u32, digests: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    h.update((1u64 << chunk_log2).to_le_bytes());
    h.update((digests.len() as u64).to_le_bytes());
    for d in digests {
        h.update(d);
    }
    h.finalize().into()
}

fn chunk_len(chunk_log2: u32) -> usize {
    1usize << chunk_log2
}

/// Tree digest of an in-memory payload, chunks hashed in parallel.
pub fn tree_digest(data: &[u8], chunk_log2: u32) -> Hash {
    let digests: Vec<Hash> = data.par_chunks(chunk_len(chunk_log2)).map(sha256).collect();
    root(chunk_log2, &digests)
}

/// Tree digest of a single-threaded pass (reference for tests and benchmarks).
pub fn tree_digest_sequential(data: &[u8], chunk_log2: u32) -> Hash {
    let digests: Vec<Hash> = data.chunks(chunk_len(chunk_log2)).map(sha256).collect();
    root(chunk_log2, &digests)
}

/// Maps a positional read error: a short read means that the file shrank under us.
pub(crate) fn read_error(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::corrupt(
            path,
            "file is shorter than its header says (truncated while reading?)",
        )
    } else {
        Error::io("read", path, e)
    }
}

/// The end of the file region `[offset, offset + len)`: an invalid argument where
/// it lies beyond the largest file offset.
pub(crate) fn region_end(offset: u64, len: u64) -> Result<u64> {
    offset.checked_add(len).ok_or_else(|| {
        Error::invalid(format!(
            "a region of {len} bytes at offset {offset} ends beyond the largest file offset"
        ))
    })
}

/// The file offset range of chunk `i < chunk_count(len)` of a payload at `offset` of
/// length `len`, where `offset + len` fits (see [`region_end`]).
pub(crate) fn chunk_range(offset: u64, len: u64, chunk_log2: u32, i: u64) -> (u64, u64) {
    let start = offset + (i << chunk_log2);
    // Saturating is exact: the end is cut to the payload's end, which fits.
    let end = start.saturating_add(1u64 << chunk_log2).min(offset + len);
    (start, end)
}

/// Tree digest of the file bytes `[offset, offset + len)`, read with positional
/// reads, chunks read and hashed in parallel. `path` is only for messages.
pub fn tree_digest_file(
    file: &File,
    offset: u64,
    len: u64,
    chunk_log2: u32,
    path: &Path,
) -> Result<Hash> {
    region_end(offset, len)?;
    let n = crate::header::chunk_count(len, chunk_log2);
    let digests = crate::parallel::map_collect((0..n).collect(), 2, |i| {
        let (start, end) = chunk_range(offset, len, chunk_log2, i);
        READ_BUFFER.with_borrow_mut(|buf| {
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(buf, start)
                .map_err(|e| read_error(path, e))?;
            Ok(sha256(buf))
        })
    })?;
    Ok(root(chunk_log2, &digests))
}

thread_local! {
    /// A thread's buffer for the chunks it reads back, kept from chunk to chunk and
    /// call to call: a fresh one per chunk would fault in new memory each time.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes to be placed at file offset `offset`.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub offset: u64,
    pub data: &'a [u8],
}

impl Segment<'_> {
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// Checks that segments lie inside `[lo, hi)` and do not overlap; returns them
/// sorted by offset (empty segments dropped).
pub fn check_segments<'a>(segments: &[Segment<'a>], lo: u64, hi: u64) -> Result<Vec<Segment<'a>>> {
    let mut sorted: Vec<Segment<'a>> = Vec::with_capacity(segments.len());
    for s in segments {
        let end = s
            .offset
            .checked_add(s.data.len() as u64)
            .filter(|&end| s.offset >= lo && end <= hi);
        if end.is_none() {
            return Err(Error::invalid(format!(
                "segment at offset {} of {} bytes lies outside the payload [{lo}, {hi})",
                s.offset,
                s.data.len()
            )));
        }
        if !s.data.is_empty() {
            sorted.push(*s);
        }
    }
    sorted.sort_by_key(|s| s.offset);
    for w in sorted.windows(2) {
        if w[0].end() > w[1].offset {
            return Err(Error::invalid(format!(
                "segments overlap: [{}, {}) and [{}, {})",
                w[0].offset,
                w[0].end(),
                w[1].offset,
                w[1].end()
            )));
        }
    }
    Ok(sorted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Straight from the formula, one hasher call per piece.
    fn reference(data: &[u8], chunk_log2: u32) -> Hash {
        let c = 1usize << chunk_log2;
        let n = data.len().div_ceil(c);
        let mut r = Sha256::new();
        r.update((c as u64).to_le_bytes());
        r.update((n as u64).to_le_bytes());
        for i in 0..n {
            let chunk = &data[i * c..((i + 1) * c).min(data.len())];
            r.update(Sha256::digest(chunk));
        }
        r.finalize().into()
    }

    /// `bytes(i % 251 for i in range(n))`
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    // Vectors computed independently with Python's hashlib:
    //   def tree(data, C):
    //       n = -(-len(data) // C)
    //       h = hashlib.sha256(C.to_bytes(8, "little") + n.to_bytes(8, "little"))
    //       for i in range(n): h.update(hashlib.sha256(data[i*C:(i+1)*C]).digest())
    //       return h.hexdigest()
    #[test]
    fn known_vectors() {
        assert_eq!(
            hex(&tree_digest(b"", 20)),
            "35c6d6e5b93657e4a741a1cec71c21813fe05aab219909ebbb0f62fb0ae648dc"
        );
        assert_eq!(
            hex(&tree_digest(b"abc", 20)),
            "f9755727e5da141a03685ec606215d3e3785418d6f940df6c6504b54d55f7149"
        );
        assert_eq!(
            hex(&tree_digest(&pattern(3 * 4096 + 5), 12)),
            "e370a1e34390e94113f38655b576262e040e308783bc12538e22926ce5d48c43"
        );
    }

    #[test]
    fn parallel_equals_reference() {
        for &(len, log2) in &[
            (0usize, 12u32),
            (1, 12),
            (4095, 12),
            (4096, 12),
            (4097, 12),
            (3 * 4096 + 5, 12),
            (100_000, 12),
            (3 << 20, 20),
            ((1 << 20) + 1, 20),
        ] {
            let data = pattern(len);
            let want = reference(&data, log2);
            assert_eq!(tree_digest(&data, log2), want, "len {len} log2 {log2}");
            assert_eq!(tree_digest_sequential(&data, log2), want);
        }
    }

    fn temp_file(data: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all(data).unwrap();
        (dir, f)
    }

    #[test]
    fn file_equals_memory() {
        let data = pattern(512 + 5 * 4096 + 17);
        let (_d, f) = temp_file(&data);
        let p = Path::new("f");
        let payload = &data[512..];
        let got = tree_digest_file(&f, 512, payload.len() as u64, 12, p).unwrap();
        assert_eq!(got, reference(payload, 12));
        // Reading past the end is a corruption (truncated), not a panic.
        let err = tree_digest_file(&f, 512, payload.len() as u64 + 1, 12, p).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        // A region beyond the largest offset is refused before anything is read.
        let err = tree_digest_file(&f, u64::MAX - 10, 11, 12, p).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn chunk_ranges_reach_the_largest_offset_without_overflow() {
        assert_eq!(chunk_range(512, 10_000, 12, 0), (512, 512 + 4096));
        assert_eq!(chunk_range(512, 10_000, 12, 2), (512 + 8192, 10_512));
        // The largest payload a header may announce: its last chunk ends at u64::MAX.
        let len = u64::MAX - 512;
        let last = crate::header::chunk_count(len, 30) - 1;
        let (start, end) = chunk_range(512, len, 30, last);
        assert_eq!(end, u64::MAX);
        assert!(start < end && end - start <= 1 << 30);
        assert_eq!(region_end(512, len).unwrap(), u64::MAX);
        assert!(region_end(513, len).is_err());
    }

    #[test]
    fn segments_are_checked() {
        let a = [1u8; 10];
        let seg = |offset, data| Segment { offset, data };
        assert!(check_segments(&[seg(512, &a[..])], 512, 522).is_ok());
        assert!(check_segments(&[seg(511, &a[..])], 512, 1000).is_err());
        assert!(check_segments(&[seg(513, &a[..])], 512, 522).is_err());
        assert!(check_segments(&[seg(u64::MAX - 3, &a[..])], 512, u64::MAX).is_err());
        assert!(check_segments(&[seg(600, &a[..]), seg(605, &a[..])], 512, 1000).is_err());
        let s = check_segments(
            &[seg(610, &a[..]), seg(600, &a[..]), seg(700, &[])],
            512,
            1000,
        )
        .unwrap();
        assert_eq!(
            s.iter().map(|s| s.offset).collect::<Vec<_>>(),
            vec![600, 610]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn memory_equals_reference(data in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            prop_assert_eq!(tree_digest(&data, 12), reference(&data, 12));
        }
    }
}
