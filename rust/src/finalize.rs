//! Sealing a checkpoint: HDF5 has written the payload at offset 512 of an open file,
//! except for some regions whose bytes are still in memory (the big arrays). This
//! writes those segments and hashes the payload in one pass, then writes the header
//! into the user block and, when asked, fsyncs.
//!
//! The segments are the caller's arrays, which another thread may change while the
//! save runs (a training loop updating its parameters in place). Whatever they hold
//! then may land in the file torn, but the digest must cover exactly the bytes that
//! land there: each piece of a segment is read from the caller's memory once, into
//! a private buffer, and that buffer is both hashed and written.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::digest::{check_segments, chunk_range, read_error, region_end, root, Hash, Segment};
use crate::error::{Error, Result};
use crate::fd;
use crate::header::{self, Header, HeaderFields, PAYLOAD_OFFSET};

/// What goes into the header besides the payload digest.
#[derive(Clone, Debug)]
pub struct Seal<'a> {
    pub batch_idx: u64,
    pub loss: f64,
    pub timestamp: f64,
    pub key: Option<&'a [u8]>,
    /// fsync the file after writing the header.
    pub durable: bool,
    pub chunk_log2: u32,
}

/// Checks the seal's key and chunk size before anything is written, and returns
/// the length of `file`.
fn checked_length(file: &File, path: &Path, seal: &Seal<'_>) -> Result<u64> {
    header::check_key(seal.key)?;
    header::check_chunk_log2(seal.chunk_log2)?;
    Ok(file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len())
}

/// Completes the checkpoint in `file` (open for reading and writing): writes each
/// segment at its offset and computes the tree digest of `[512, file length)` as
/// written (see [`write_and_digest`]), writes the header at offset 0 and fsyncs
/// when `seal.durable`. `path` is for messages.
///
/// Segments must lie inside `[512, file length)` without overlapping.
pub fn finalize(
    file: &File,
    path: &Path,
    segments: &[Segment<'_>],
    seal: &Seal<'_>,
) -> Result<Header> {
    let len = checked_length(file, path, seal)?;
    if len < PAYLOAD_OFFSET {
        return Err(Error::invalid(format!(
            "{}: the file is {len} bytes long, shorter than the {PAYLOAD_OFFSET}-byte user block \
             (was it written with userblock_size={PAYLOAD_OFFSET}?)",
            path.display()
        )));
    }
    let segments = check_segments(segments, PAYLOAD_OFFSET, len)?;
    let payload_length = len - PAYLOAD_OFFSET;
    if seal.durable {
        // What HDF5 wrote is complete: send it to the disk while the rest is written.
        start_writeback(file, 0, len);
    }
    let digest = write_and_digest(
        file,
        PAYLOAD_OFFSET,
        payload_length,
        seal.chunk_log2,
        &segments,
        seal.durable,
        path,
        PIECE,
    )?;
    let fields = HeaderFields {
        payload_length,
        chunk_log2: seal.chunk_log2,
        batch_idx: seal.batch_idx,
        loss: seal.loss,
        timestamp: seal.timestamp,
        payload_digest: digest,
    };
    let bytes = header::encode(&fields, seal.key)?;
    file.write_all_at(&bytes, 0)
        .map_err(|e| Error::io("write", path, e))?;
    if seal.durable {
        file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    }
    header::parse(&bytes).map_err(|e| e.with_path(path))
}

/// Writes a whole checkpoint into the empty file `file`: the header, then `image`
/// (the payload, the file from offset 512 on), in one write, and fsyncs when
/// `seal.durable`. The digest is computed from `image`, which must not change while
/// this runs (an immutable buffer: the file image of a checkpoint built in memory).
/// `path` is for messages.
///
/// One write of the whole file: writing the payload and then the header into its
/// first page (as [`finalize`] does) makes a durable save write that page twice.
pub fn seal_image(file: &File, path: &Path, image: &[u8], seal: &Seal<'_>) -> Result<Header> {
    let len = checked_length(file, path, seal)?;
    if len != 0 {
        return Err(Error::invalid(format!(
            "{}: the file must be empty, it is {len} bytes long",
            path.display()
        )));
    }
    let chunk = 1usize << seal.chunk_log2;
    let chunks: Vec<&[u8]> = image.chunks(chunk).collect();
    let digests = crate::parallel::map_all(chunks, 2, crate::digest::sha256);
    let fields = HeaderFields {
        payload_length: image.len() as u64,
        chunk_log2: seal.chunk_log2,
        batch_idx: seal.batch_idx,
        loss: seal.loss,
        timestamp: seal.timestamp,
        payload_digest: root(seal.chunk_log2, &digests),
    };
    let head = header::encode(&fields, seal.key)?;
    let mut whole = Vec::with_capacity(head.len() + image.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(image);
    file.write_all_at(&whole, 0)
        .map_err(|e| Error::io("write", path, e))?;
    if seal.durable {
        file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    }
    header::parse(&head).map_err(|e| e.with_path(path))
}

/// [`seal_image`] on a raw descriptor the caller keeps owning: it is neither closed
/// nor otherwise changed, except for the bytes written. A descriptor that cannot be
/// written fails the write.
pub fn seal_image_fd(fd: RawFd, image: &[u8], seal: &Seal<'_>) -> Result<Header> {
    let path = fd::path_of(fd);
    fd::with_borrowed_file(fd, &path, |file| seal_image(file, &path, image, seal))
}

/// Bytes copied, hashed and written at a time: a worker's private buffer holds one
/// piece (whatever the digest chunk size), and the copy is still in the CPU cache
/// when it is hashed and written.
const PIECE: usize = 1 << 20;

/// Writes each segment at its offset and returns the tree digest of the file region
/// `[offset, offset + len)` as it then is: segment bytes as written, all other bytes
/// read back from `file` (what HDF5 wrote, from the page cache). Digest chunks are
/// done in parallel, each by one worker, which copies, hashes and writes `piece`
/// bytes at a time ([`PIECE`]; tests vary it). With `writeback`, each written piece
/// is handed to the disk at once.
///
/// `segments` are sorted, non-overlapping and inside the region (see
/// [`check_segments`]). Their memory may change while this runs: it is read once,
/// and only that copy is hashed and written, so the digest always matches the file.
#[allow(clippy::too_many_arguments)]
fn write_and_digest(
    file: &File,
    offset: u64,
    len: u64,
    chunk_log2: u32,
    segments: &[Segment<'_>],
    writeback: bool,
    path: &Path,
    piece: usize,
) -> Result<Hash> {
    region_end(offset, len)?;
    let n = crate::header::chunk_count(len, chunk_log2);
    let digests = crate::parallel::map_collect((0..n).collect(), 2, |i| {
        let (start, end) = chunk_range(offset, len, chunk_log2, i);
        BUFFER.with_borrow_mut(|buf| {
            let mut chunk = ChunkSealer {
                file,
                path,
                buf,
                piece,
                writeback,
                hasher: Sha256::new(),
            };
            chunk.seal(start, end, segments)?;
            Ok::<Hash, Error>(chunk.hasher.finalize().into())
        })
    })?;
    Ok(root(chunk_log2, &digests))
}

thread_local! {
    /// A worker's private buffer (at most one piece), kept from call to call: one
    /// per rayon job instead would fault in fresh memory every few chunks, which
    /// costs as much as the copy itself. Nothing inside its use waits for rayon, so
    /// a worker never runs a second job while it is borrowed.
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One digest chunk being hashed (and its segment parts written) by one worker.
struct ChunkSealer<'a> {
    file: &'a File,
    path: &'a Path,
    /// The worker's private buffer, reused from chunk to chunk.
    buf: &'a mut Vec<u8>,
    piece: usize,
    writeback: bool,
    hasher: Sha256,
}

impl ChunkSealer<'_> {
    fn seal(&mut self, start: u64, end: u64, segments: &[Segment<'_>]) -> Result<()> {
        // First segment that ends after `start`.
        let first = segments.partition_point(|s| s.end() <= start);
        let mut pos = start;
        for s in &segments[first..] {
            if s.offset >= end {
                break;
            }
            let s_start = s.offset.max(start);
            let s_end = s.end().min(end);
            if pos < s_start {
                self.read_back(pos, s_start)?;
            }
            let from = (s_start - s.offset) as usize;
            self.copy_and_write(&s.data[from..from + (s_end - s_start) as usize], s_start)?;
            pos = s_end;
        }
        if pos < end {
            self.read_back(pos, end)?;
        }
        Ok(())
    }

    /// This worker's buffer, `n <= piece` bytes long.
    fn buffer(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        &mut self.buf[..n]
    }

    /// Hashes the file bytes `[from, to)`, read back.
    fn read_back(&mut self, from: u64, to: u64) -> Result<()> {
        let mut at = from;
        while at < to {
            let n = self.piece.min((to - at) as usize);
            let (file, path) = (self.file, self.path);
            let buf = self.buffer(n);
            file.read_exact_at(buf, at)
                .map_err(|e| read_error(path, e))?;
            self.hasher.update(&self.buf[..n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Writes `data` (the caller's memory) at file offset `at` and hashes it, a
    /// piece at a time, each copied once into the private buffer first.
    fn copy_and_write(&mut self, data: &[u8], mut at: u64) -> Result<()> {
        for src in data.chunks(self.piece) {
            let (file, path, writeback) = (self.file, self.path, self.writeback);
            let buf = self.buffer(src.len());
            // The one read of the caller's memory for these bytes.
            buf.copy_from_slice(src);
            file.write_all_at(buf, at)
                .map_err(|e| Error::io("write", path, e))?;
            if writeback {
                start_writeback(file, at, src.len() as u64);
            }
            self.hasher.update(&self.buf[..src.len()]);
            at += src.len() as u64;
        }
        Ok(())
    }
}

/// Starts writing the dirty pages of `[offset, offset + len)` to the disk without
/// waiting for them, so that the final fsync finds most of the work done: the disk
/// works while the rest of the payload is written and hashed. Only a hint: errors
/// are left to the fsync, which reports them.
/// `len == 0` means up to the end of the file.
#[cfg(target_os = "linux")]
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is
    // open for the whole call.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// [`start_writeback`] on a raw descriptor the caller keeps owning; a descriptor
/// that is not open is ignored (it is only a hint).
pub fn start_writeback_fd(fd: RawFd, offset: u64, len: u64) {
    let _ = fd::with_borrowed_file(fd, Path::new(""), |file| {
        start_writeback(file, offset, len);
        Ok(())
    });
}

/// [`finalize`] on a raw file descriptor that the caller keeps owning: it is neither
/// closed nor otherwise changed, except for the bytes written. The descriptor must be
/// open for reading and writing and not in append mode.
pub fn finalize_fd(fd: RawFd, segments: &[Segment<'_>], seal: &Seal<'_>) -> Result<Header> {
    let path = fd::path_of(fd);
    fd::with_borrowed_file(fd, &path, |file| {
        check_read_write(file, &path)?;
        finalize(file, &path, segments, seal)
    })
}

/// Checks that `file` is open for reading and writing (the payload is read back and
/// written) and not in append mode (which would put every write at the end).
fn check_read_write(file: &File, path: &Path) -> Result<()> {
    // SAFETY: fcntl(F_GETFL) only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags == -1 {
        return Err(Error::io("use", path, std::io::Error::last_os_error()));
    }
    if flags & libc::O_ACCMODE != libc::O_RDWR {
        return Err(Error::invalid(format!(
            "{}: the file descriptor must be open for reading and writing",
            path.display()
        )));
    }
    if flags & libc::O_APPEND != 0 {
        return Err(Error::invalid(format!(
            "{}: the file descriptor must not be in append mode",
            path.display()
        )));
    }
    Ok(())
}

/// fsyncs a directory, so that a rename or unlink in it is durable. File systems
/// that cannot fsync a directory (EINVAL) are taken as done.
pub fn fsync_directory(path: &Path) -> Result<()> {
    // O_DIRECTORY: a FIFO put in the directory's place must not block the open.
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    match dir.sync_all() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(Error::io("fsync", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::tree_digest;
    use crate::verify::tests::read_verified;
    use crate::verify::verify_file;
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    fn seal(key: Option<&[u8]>) -> Seal<'_> {
        Seal {
            batch_idx: 17,
            loss: 0.5,
            timestamp: 1234.5,
            key,
            durable: true,
            chunk_log2: 12,
        }
    }

    /// A file as HDF5 leaves it: 512 zero bytes, "hdf5 part" bytes, and holes.
    fn setup(len: usize, holes: &[(usize, usize)]) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ck.h5");
        let want: Vec<u8> = (0..len)
            .map(|i| if i < 512 { 0 } else { (i * 13 % 251) as u8 })
            .collect();
        let mut disk = want.clone();
        for &(a, b) in holes {
            disk[a..b].fill(0);
        }
        std::fs::write(&p, &disk).unwrap();
        (d, p, want)
    }

    fn open_rw(p: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn seals_a_file_with_segments() {
        let len = 512 + 10 * 4096 + 123;
        let holes = [
            (600, 5000),
            (8192 + 512, 8192 + 512 + 4096),
            (len - 50, len),
        ];
        let (_d, p, want) = setup(len, &holes);
        let f = open_rw(&p);
        let segs: Vec<Segment> = holes
            .iter()
            .map(|&(a, b)| Segment {
                offset: a as u64,
                data: &want[a..b],
            })
            .collect();
        let h = finalize_fd(f.as_raw_fd(), &segs, &seal(None)).unwrap();
        assert_eq!(h.payload_length, (len - 512) as u64);
        assert_eq!(h.payload_digest, tree_digest(&want[512..], 12));
        assert_eq!(h.batch_idx, 17);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[512..], &want[512..]);
        assert_eq!(header::parse(&bytes).unwrap(), h);
        assert_eq!(verify_file(&p, None).unwrap(), h);
        // The fd is still open and usable.
        assert!(f.metadata().is_ok());
    }

    #[test]
    fn segments_longer_than_one_piece() {
        // Two segments that are written in several pieces, one ending the file.
        let len = 512 + 4096 + 2 * PIECE + 77 + 4096 + PIECE + 5;
        let a = (512 + 4096, 512 + 4096 + 2 * PIECE + 77);
        let b = (a.1 + 4096, len);
        let (_d, p, want) = setup(len, &[a, b]);
        let f = open_rw(&p);
        let segs = [
            Segment {
                offset: a.0 as u64,
                data: &want[a.0..a.1],
            },
            Segment {
                offset: b.0 as u64,
                data: &want[b.0..b.1],
            },
        ];
        for durable in [true, false] {
            let mut s = seal(None);
            s.durable = durable;
            for chunk_log2 in [12, 20, 23] {
                s.chunk_log2 = chunk_log2;
                let h = finalize(&f, &p, &segs, &s).unwrap();
                assert_eq!(h.payload_digest, tree_digest(&want[512..], chunk_log2));
                assert_eq!(&std::fs::read(&p).unwrap()[512..], &want[512..]);
            }
        }
    }

    /// Segments change in memory while they are written, as an array updated in place
    /// by another thread does: the digest is the digest of the file as written.
    #[test]
    fn digest_matches_the_file_while_segments_change() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let words = 3 * PIECE / 8 + 1000;
        let len = 512 + 4096 + words * 8 + 300;
        let seg_at = 512 + 4096;
        let (_d, p, _) = setup(len, &[(seg_at, seg_at + words * 8)]);
        let memory: Vec<AtomicU64> = (0..words as u64).map(AtomicU64::new).collect();
        let stop = AtomicBool::new(false);
        let rounds = AtomicU64::new(0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for w in &memory {
                        w.fetch_add(1, Ordering::Relaxed);
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
            // SAFETY: the bytes of the atomics, read while another thread changes
            // them, as the caller's arrays are read from Python; any value read is
            // acceptable, it only has to be the same in the file and in the digest.
            let data =
                unsafe { std::slice::from_raw_parts(memory.as_ptr().cast::<u8>(), words * 8) };
            let seg = [Segment {
                offset: seg_at as u64,
                data,
            }];
            let f = open_rw(&p);
            // Until a save has overlapped with whole rounds of changes, for each
            // chunk size.
            let mut raced = 0;
            for attempt in 0..300 {
                let mut s = seal(None);
                s.chunk_log2 = [12, 16, 20][attempt % 3];
                let before = rounds.load(Ordering::Relaxed);
                let h = finalize(&f, &p, &seg, &s).unwrap();
                if rounds.load(Ordering::Relaxed) >= before + 2 {
                    raced += 1;
                }
                let bytes = std::fs::read(&p).unwrap();
                assert_eq!(h.payload_digest, tree_digest(&bytes[512..], s.chunk_log2));
                assert_eq!(verify_file(&p, None).unwrap(), h);
                if raced >= 3 {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(raced >= 3, "the updates never overlapped a save");
        });
        assert!(rounds.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn seals_an_image_in_one_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ck.h5");
        let image: Vec<u8> = (0..3 * 4096 + 77).map(|i| (i * 7 % 253) as u8).collect();
        for (chunk_log2, key) in [(12, None), (20, Some(&b"k"[..]))] {
            std::fs::write(&p, b"").unwrap();
            let f = open_rw(&p);
            let mut s = seal(key);
            s.chunk_log2 = chunk_log2;
            let h = seal_image_fd(f.as_raw_fd(), &image, &s).unwrap();
            assert_eq!(h.payload_length, image.len() as u64);
            assert_eq!(h.payload_digest, tree_digest(&image, chunk_log2));
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[512..], &image[..]);
            assert_eq!(verify_file(&p, key).unwrap(), h);
        }
        // Only into an empty file, and one that can be written.
        let e = seal_image(&open_rw(&p), &p, &image, &seal(None)).unwrap_err();
        assert!(e.to_string().contains("must be empty"), "{e}");
        std::fs::write(&p, b"").unwrap();
        let ro = File::open(&p).unwrap();
        let e = seal_image_fd(ro.as_raw_fd(), &image, &seal(None)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF), "{e}");
        assert!(matches!(
            seal_image_fd(-1, &image, &seal(None)),
            Err(Error::InvalidArgument(_))
        ));
        let mut s = seal(None);
        s.chunk_log2 = 11;
        assert!(matches!(
            seal_image(&open_rw(&p), &p, &image, &s),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn keyed_and_empty_payload() {
        let (_d, p, _) = setup(512, &[]);
        let f = open_rw(&p);
        let h = finalize(&f, &p, &[], &seal(Some(b"k"))).unwrap();
        assert!(h.keyed());
        assert_eq!(h.payload_length, 0);
        verify_file(&p, Some(b"k")).unwrap();
        let (_, bytes) = read_verified(&p, Some(b"k")).unwrap();
        assert_eq!(bytes.len(), 512);
    }

    #[test]
    fn rejects_bad_segments_and_files() {
        let (_d, p, want) = setup(512 + 4096, &[]);
        let f = open_rw(&p);
        let seg = |offset: u64, n: usize| Segment {
            offset,
            data: &want[..n],
        };
        for bad in [
            vec![seg(0, 10)],
            vec![seg(511, 10)],
            vec![seg(512 + 4090, 10)],
            vec![seg(600, 100), seg(650, 100)],
        ] {
            let e = finalize(&f, &p, &bad, &seal(None)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
        let mut s = seal(None);
        s.chunk_log2 = 11;
        assert!(matches!(
            finalize(&f, &p, &[], &s),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            finalize(&f, &p, &[], &seal(Some(b""))),
            Err(Error::InvalidArgument(_))
        ));
        // Nothing was written by the rejected calls.
        assert_eq!(std::fs::read(&p).unwrap(), want);

        let (_d2, short, _) = setup(100, &[]);
        let e = finalize(&open_rw(&short), &short, &[], &seal(None)).unwrap_err();
        assert!(e.to_string().contains("user block"), "{e}");

        let ro = File::open(&p).unwrap();
        let e = finalize_fd(ro.as_raw_fd(), &[], &seal(None)).unwrap_err();
        assert!(e.to_string().contains("reading and writing"), "{e}");
        let app = OpenOptions::new().read(true).append(true).open(&p).unwrap();
        let e = finalize_fd(app.as_raw_fd(), &[], &seal(None)).unwrap_err();
        assert!(e.to_string().contains("append"), "{e}");
        assert!(matches!(
            finalize_fd(-1, &[], &seal(None)),
            Err(Error::InvalidArgument(_))
        ));
        let e = finalize_fd(RawFd::MAX, &[], &seal(None)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF));
        // The hint ignores descriptors that are not open.
        start_writeback_fd(-1, 0, 0);
        start_writeback_fd(RawFd::MAX, 0, 0);
        start_writeback_fd(f.as_raw_fd(), 0, 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever segments cover and however pieces and chunks fall, the file holds
        /// the segment bytes afterwards (and nothing else changed), and the digest is
        /// that of the final file.
        #[test]
        fn writes_segments_and_digests_the_final_file(
            len in 0usize..30_000,
            cuts in proptest::collection::vec((0usize..30_000, 0usize..9_000), 0..6),
            piece in proptest::sample::select(vec![1usize, 1000, 4096, 5000, PIECE]),
            chunk_log2 in 12u32..15,
            seed in proptest::prelude::any::<u8>(),
        ) {
            let final_bytes: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            let mut ranges: Vec<(usize, usize)> = Vec::new();
            for (a, l) in cuts {
                if a >= len {
                    continue;
                }
                let b = (a + l).min(len);
                if ranges.iter().all(|&(x, y)| b <= x || a >= y) {
                    ranges.push((a, b));
                }
            }
            // On disk: the final bytes except under segments (garbage there).
            let mut disk = vec![0xEEu8; 512];
            disk.extend_from_slice(&final_bytes);
            for &(a, b) in &ranges {
                disk[512 + a..512 + b].fill(0x5A);
            }
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("f");
            std::fs::write(&p, &disk).unwrap();
            let f = open_rw(&p);
            let segments: Vec<Segment> = ranges
                .iter()
                .map(|&(a, b)| Segment { offset: 512 + a as u64, data: &final_bytes[a..b] })
                .collect();
            let segments = check_segments(&segments, 512, 512 + len as u64).unwrap();
            let got = write_and_digest(
                &f, 512, len as u64, chunk_log2, &segments, false, &p, piece,
            )
            .unwrap();
            let bytes = std::fs::read(&p).unwrap();
            proptest::prop_assert_eq!(&bytes[..512], &disk[..512]);
            proptest::prop_assert_eq!(&bytes[512..], &final_bytes[..]);
            proptest::prop_assert_eq!(got, tree_digest(&final_bytes, chunk_log2));
        }
    }

    #[test]
    fn a_failed_read_back_or_write_is_an_error() {
        // The file is shorter than the region: reading back the gap fails as a
        // truncation, not a panic.
        let (_d, p, want) = setup(512 + 100, &[]);
        let f = open_rw(&p);
        let e = write_and_digest(&f, 512, 200, 12, &[], false, &p, PIECE).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        // A descriptor open read-only cannot take the segment bytes.
        let ro = File::open(&p).unwrap();
        let seg = [Segment {
            offset: 512,
            data: &want[512..612],
        }];
        let e = write_and_digest(&ro, 512, 100, 12, &seg, false, &p, PIECE).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF), "{e}");
    }

    #[test]
    fn fsync_dir() {
        let d = tempfile::tempdir().unwrap();
        fsync_directory(d.path()).unwrap();
        let e = fsync_directory(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
    }
}
