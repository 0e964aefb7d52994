//! Sealing a checkpoint: HDF5 has written the payload at offset 512 of an open file,
//! except for some regions whose bytes are still in memory (the big arrays). This
//! writes those segments while hashing the payload, then writes the header into the
//! user block and, when asked, fsyncs.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::digest::{check_segments, tree_digest_mixed, Segment};
use crate::error::{Error, Result};
use crate::header::{self, Header, HeaderFields, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2, PAYLOAD_OFFSET};

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

/// Completes the checkpoint in `file` (open for reading and writing): writes each
/// segment at its offset while computing the tree digest of `[512, file length)`
/// (segment bytes hashed from memory, all other bytes read from the file), writes
/// the header at offset 0 and fsyncs when `seal.durable`. `path` is for messages.
///
/// Segments must lie inside `[512, file length)` without overlapping.
pub fn finalize(
    file: &File,
    path: &Path,
    segments: &[Segment<'_>],
    seal: &Seal<'_>,
) -> Result<Header> {
    header::check_key(seal.key)?;
    if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&seal.chunk_log2) {
        return Err(Error::invalid(format!(
            "chunk_log2 must be in {MIN_CHUNK_LOG2}..={MAX_CHUNK_LOG2}, got {}",
            seal.chunk_log2
        )));
    }
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
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
    // Writing and hashing need each other for nothing: segment bytes are hashed
    // from memory, the rest is read back from the page cache.
    let (written, digest) = rayon::join(
        || write_segments(file, path, &segments, seal.durable),
        || {
            tree_digest_mixed(
                file,
                PAYLOAD_OFFSET,
                payload_length,
                seal.chunk_log2,
                &segments,
                path,
            )
        },
    );
    written?;
    let fields = HeaderFields {
        payload_length,
        chunk_log2: seal.chunk_log2,
        batch_idx: seal.batch_idx,
        loss: seal.loss,
        timestamp: seal.timestamp,
        payload_digest: digest?,
    };
    let bytes = header::encode(&fields, seal.key)?;
    file.write_all_at(&bytes, 0)
        .map_err(|e| Error::io("write", path, e))?;
    if seal.durable {
        file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    }
    header::parse(&bytes).map_err(|e| e.with_path(path))
}

/// Bytes written per `pwrite`; with `writeback`, each piece is handed to the disk
/// as soon as it is in the page cache.
const WRITE_PIECE: usize = 8 << 20;

fn write_segments(
    file: &File,
    path: &Path,
    segments: &[Segment<'_>],
    writeback: bool,
) -> Result<()> {
    for s in segments {
        let mut offset = s.offset;
        for piece in s.data.chunks(WRITE_PIECE) {
            file.write_all_at(piece, offset)
                .map_err(|e| Error::io("write", path, e))?;
            if writeback {
                start_writeback(file, offset, piece.len() as u64);
            }
            offset += piece.len() as u64;
        }
    }
    Ok(())
}

/// Starts writing the dirty pages of `[offset, offset + len)` to the disk without
/// waiting for them, so that the final fsync finds most of the work done: the disk
/// works while the rest of the payload is written and hashed. Only a hint: errors
/// are left to the fsync, which reports them.
/// `len == 0` means up to the end of the file.
#[cfg(target_os = "linux")]
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
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

/// [`start_writeback`] on a raw descriptor the caller keeps owning; an invalid
/// descriptor is ignored (it is only a hint).
pub fn start_writeback_fd(fd: RawFd, offset: u64, len: u64) {
    if fd < 0 {
        return;
    }
    // SAFETY: the caller keeps the descriptor open for the call; ManuallyDrop keeps
    // this `File` from closing it. A descriptor that is not open makes the hint fail.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    start_writeback(&file, offset, len);
}

/// [`finalize`] on a raw file descriptor that the caller keeps owning: it is neither
/// closed nor otherwise changed, except for the bytes written. The descriptor must be
/// open for reading and writing and not in append mode.
pub fn finalize_fd(fd: RawFd, segments: &[Segment<'_>], seal: &Seal<'_>) -> Result<Header> {
    let path = fd_path(fd);
    if fd < 0 {
        return Err(Error::invalid(format!("invalid file descriptor {fd}")));
    }
    // SAFETY: fcntl only inspects the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
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
    // SAFETY: the descriptor is open (checked above) and stays open for the whole call:
    // the caller owns it. ManuallyDrop keeps this `File` from closing it.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    finalize(&file, &path, segments, seal)
}

/// A name for `fd` in messages: the path it was opened with, when the OS tells.
pub(crate) fn fd_path(fd: RawFd) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap_or_else(|_| PathBuf::from(format!("<file descriptor {fd}>")))
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
    use crate::verify::{read_verified, verify_file};
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;

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
    fn segments_longer_than_one_write_piece() {
        // Two segments that are written in several pieces, one ending the file.
        let len = 512 + 4096 + 2 * WRITE_PIECE + 77 + 4096 + WRITE_PIECE + 5;
        let a = (512 + 4096, 512 + 4096 + 2 * WRITE_PIECE + 77);
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
            s.chunk_log2 = 20;
            let h = finalize(&f, &p, &segs, &s).unwrap();
            assert_eq!(h.payload_digest, tree_digest(&want[512..], 20));
            assert_eq!(&std::fs::read(&p).unwrap()[512..], &want[512..]);
        }
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
        let e = finalize_fd(1 << 20, &[], &seal(None)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF));
    }

    #[test]
    fn fsync_dir() {
        let d = tempfile::tempdir().unwrap();
        fsync_directory(d.path()).unwrap();
        let e = fsync_directory(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
    }
}
