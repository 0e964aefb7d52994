//! Verification of checkpoint files: header, length, payload digest and (keyed)
//! HMAC tag.

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rayon::prelude::*;

use crate::digest::{read_error, root, sha256, tree_digest_file, Hash};
use crate::error::{Error, Result};
use crate::fd;
use crate::header::{self, Header, HEADER_SIZE};

/// Opens `path` for reading and returns the file and its length.
///
/// Without blocking: opening a FIFO for reading would wait for a writer forever.
/// The flag does nothing to a regular file, and anything else is refused before a
/// byte is read. A symlink is followed; its target must be a regular file.
pub fn open(path: &Path) -> Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let len = regular_file_len(&file, path)?;
    Ok((file, len))
}

/// The length of `file`, which must be a regular file: a checkpoint is no FIFO,
/// device or directory.
fn regular_file_len(file: &File, path: &Path) -> Result<u64> {
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::corrupt(path, "not a regular file"));
    }
    Ok(meta.len())
}

/// Reads up to `buf.len()` bytes at offset 0; returns how many were read (fewer
/// only at end of file).
pub(crate) fn read_prefix(file: &File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    Ok(done)
}

/// Parses the first 512 bytes of an open file (`bytes` holds them) and checks that
/// the file length `len` agrees with the header.
fn parse_and_check_length(bytes: &[u8], len: u64, path: &Path) -> Result<Header> {
    let header = header::parse(bytes).map_err(|e| e.with_path(path))?;
    check_length(&header, len, path)?;
    Ok(header)
}

/// Checks that the file length is exactly `payload_offset + payload_length`.
pub fn check_length(header: &Header, len: u64, path: &Path) -> Result<()> {
    let Some(want) = header.file_length() else {
        return Err(Error::corrupt(
            path,
            format!("payload_length {} is out of range", header.payload_length),
        ));
    };
    if len < want {
        Err(Error::corrupt(
            path,
            format!("file is truncated: {len} bytes, the header says {want}"),
        ))
    } else if len > want {
        Err(Error::corrupt(
            path,
            format!(
                "file has {} extra bytes after the payload ({len} bytes, the header says {want})",
                len - want
            ),
        ))
    } else {
        Ok(())
    }
}

fn read_header_bytes(file: &File, path: &Path) -> Result<([u8; HEADER_SIZE], usize)> {
    let mut bytes = [0u8; HEADER_SIZE];
    let got = read_prefix(file, &mut bytes, path)?;
    Ok((bytes, got))
}

/// Reads and parses a file's header and checks the file length against it.
pub fn read_header(path: &Path) -> Result<Header> {
    let (file, len) = open(path)?;
    let (bytes, got) = read_header_bytes(&file, path)?;
    parse_and_check_length(&bytes[..got], len, path)
}

fn check_payload(header: &Header, digest: &Hash, path: &Path) -> Result<()> {
    if *digest != header.payload_digest {
        return Err(Error::corrupt(
            path,
            "payload digest mismatch (file changed or corrupted)",
        ));
    }
    Ok(())
}

fn check_key(
    header: &Header,
    bytes: &[u8; HEADER_SIZE],
    key: Option<&[u8]>,
    path: &Path,
) -> Result<()> {
    match key {
        Some(key) => header::check_hmac(key, bytes, header, path),
        None => Ok(()),
    }
}

/// Verifies one file completely: header, length, payload digest, and with a key the
/// HMAC tag (a keyed reader rejects a file without one).
pub fn verify_file(path: &Path, key: Option<&[u8]>) -> Result<Header> {
    header::check_key(key)?;
    let (file, len) = open(path)?;
    verify_opened(&file, len, path, key)
}

/// [`verify_file`] of a file the caller has open (`fd`, kept open, its offset
/// unchanged): what is verified is that file, whatever its name points to by now.
/// `path` names it in messages.
pub fn verify_fd(fd: RawFd, path: &Path, key: Option<&[u8]>) -> Result<Header> {
    header::check_key(key)?;
    fd::with_borrowed_file(fd, path, |file| {
        let len = regular_file_len(file, path)?;
        verify_opened(file, len, path, key)
    })
}

/// [`verify_fd`] over many descriptors in parallel; one result per descriptor.
pub fn verify_fds<P: AsRef<Path> + Sync>(
    fds: &[RawFd],
    paths: &[P],
    key: Option<&[u8]>,
) -> Vec<Result<Header>> {
    let jobs: Vec<(RawFd, &P)> = fds.iter().copied().zip(paths).collect();
    crate::parallel::map_all(jobs, 2, |(fd, p)| verify_fd(fd, p.as_ref(), key))
}

fn verify_opened(file: &File, len: u64, path: &Path, key: Option<&[u8]>) -> Result<Header> {
    let (bytes, got) = read_header_bytes(file, path)?;
    let header = parse_and_check_length(&bytes[..got], len, path)?;
    // Authenticate the header before spending time on the payload.
    check_key(&header, &bytes, key, path)?;
    let digest = tree_digest_file(
        file,
        header.payload_offset,
        header.payload_length,
        header.chunk_log2,
        path,
    )?;
    check_payload(&header, &digest, path)?;
    Ok(header)
}

/// [`verify_file`] over many files in parallel; one result per path, in order.
pub fn verify_files<P: AsRef<Path> + Sync>(paths: &[P], key: Option<&[u8]>) -> Vec<Result<Header>> {
    paths
        .par_iter()
        .map(|p| verify_file(p.as_ref(), key))
        .collect()
}

/// Reads a whole open file of length `buf.len()` into `buf` and verifies it from
/// memory. The header is read first (it gives the chunk size); then every rayon task
/// reads one chunk into its own slice of `buf` and hashes it while it is hot.
fn read_verified_into(
    file: &File,
    path: &Path,
    key: Option<&[u8]>,
    buf: &mut [u8],
) -> Result<Header> {
    header::check_key(key)?;
    let len = buf.len() as u64;
    let head_len = buf.len().min(HEADER_SIZE);
    let (head, payload) = buf.split_at_mut(head_len);
    file.read_exact_at(head, 0)
        .map_err(|e| read_error(path, e))?;
    let header = parse_and_check_length(head, len, path)?;
    let head: &[u8; HEADER_SIZE] = (&*head)
        .try_into()
        .map_err(|_| Error::corrupt(path, "truncated header"))?;
    check_key(&header, head, key, path)?;
    let chunk = 1usize << header.chunk_log2;
    let offset = header.payload_offset;
    let chunks: Vec<(usize, &mut [u8])> = payload.chunks_mut(chunk).enumerate().collect();
    let digests = crate::parallel::map_collect(chunks, 2, |(i, dst)| {
        file.read_exact_at(dst, offset + (i as u64) * chunk as u64)
            .map_err(|e| read_error(path, e))?;
        Ok(sha256(dst))
    })?;
    check_payload(&header, &root(header.chunk_log2, &digests), path)?;
    Ok(header)
}

/// Reads the whole file open as `fd`, which the caller keeps owning (not closed,
/// its offset unchanged), into `buf`, which must be exactly as long as the file, and
/// verifies it from memory. Every byte of `buf` is overwritten when this returns
/// `Ok`.
///
/// `path` names the file in messages (default: what the OS tells of `fd`).
pub fn read_verified_fd(
    fd: RawFd,
    path: Option<&Path>,
    key: Option<&[u8]>,
    buf: &mut [u8],
) -> Result<Header> {
    let path = path.map_or_else(|| fd::path_of(fd), Path::to_path_buf);
    fd::with_borrowed_file(fd, &path, |file| {
        let len = regular_file_len(file, &path)?;
        if len != buf.len() as u64 {
            return Err(Error::corrupt(
                &path,
                format!(
                    "the file is {len} bytes long, the buffer for it {} (did it change?)",
                    buf.len()
                ),
            ));
        }
        read_verified_into(file, &path, key, buf)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::digest::tree_digest;
    use crate::header::{encode, HeaderFields};
    use std::os::fd::AsRawFd;

    pub(crate) fn make_file(
        dir: &Path,
        name: &str,
        payload: &[u8],
        key: Option<&[u8]>,
    ) -> std::path::PathBuf {
        let fields = HeaderFields {
            payload_length: payload.len() as u64,
            chunk_log2: 12,
            batch_idx: 3,
            loss: 1.5,
            timestamp: 10.0,
            payload_digest: tree_digest(payload, 12),
        };
        let mut bytes = encode(&fields, key).unwrap().to_vec();
        bytes.extend_from_slice(payload);
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Reads and verifies a whole file through a descriptor, as a load does.
    pub(crate) fn read_verified(p: &Path, key: Option<&[u8]>) -> Result<(Header, Vec<u8>)> {
        let f = File::open(p).map_err(|e| Error::io("open", p, e))?;
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        let header = read_verified_fd(f.as_raw_fd(), Some(p), key, &mut buf)?;
        Ok((header, buf))
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 256) as u8).collect()
    }

    #[test]
    fn good_file_verifies() {
        let d = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 5] {
            let p = make_file(d.path(), "a.h5", &payload(n), None);
            let h = verify_file(&p, None).unwrap();
            assert_eq!(h.payload_length, n as u64);
            assert_eq!(read_header(&p).unwrap(), h);
            let (h2, bytes) = read_verified(&p, None).unwrap();
            assert_eq!(h2, h);
            assert_eq!(bytes, std::fs::read(&p).unwrap());
        }
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let p = make_file(d.path(), "a.h5", &payload(2 * 4096 + 100), None);
        let orig = std::fs::read(&p).unwrap();
        for at in (0..orig.len())
            .step_by(37)
            .chain([0, 511, 512, orig.len() - 1])
        {
            let mut m = orig.clone();
            m[at] ^= 0x40;
            std::fs::write(&p, &m).unwrap();
            let e = verify_file(&p, None).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt { .. } | Error::Version { .. }),
                "{at}: {e}"
            );
            assert!(read_verified(&p, None).is_err(), "{at}");
        }
        std::fs::write(&p, &orig).unwrap();
        let e = verify_file(&p, None).unwrap();
        assert_eq!(e.batch_idx, 3);
    }

    #[test]
    fn digest_mismatch_message_names_file() {
        let d = tempfile::tempdir().unwrap();
        let p = make_file(d.path(), "a.h5", &payload(5000), None);
        let mut m = std::fs::read(&p).unwrap();
        m[4000] ^= 1;
        std::fs::write(&p, &m).unwrap();
        let e = verify_file(&p, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "checkpoint {}: payload digest mismatch (file changed or corrupted)",
                p.display()
            )
        );
    }

    #[test]
    fn length_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let p = make_file(d.path(), "a.h5", &payload(5000), None);
        let orig = std::fs::read(&p).unwrap();
        let mut longer = orig.clone();
        longer.push(0);
        std::fs::write(&p, &longer).unwrap();
        let e = verify_file(&p, None).unwrap_err();
        assert!(e.to_string().contains("extra bytes"), "{e}");
        assert!(read_header(&p).is_err());
        std::fs::write(&p, &orig[..orig.len() - 1]).unwrap();
        assert!(verify_file(&p, None)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        std::fs::write(&p, &orig[..100]).unwrap();
        assert!(verify_file(&p, None)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(read_verified(&p, None).is_err());
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(verify_file(&p, None), Err(Error::Corrupt { .. })));
        assert!(matches!(
            read_verified(&p, None),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn read_into_a_buffer_from_a_descriptor() {
        let d = tempfile::tempdir().unwrap();
        let p = make_file(d.path(), "a.h5", &payload(3 * 4096 + 5), Some(b"k"));
        let want = std::fs::read(&p).unwrap();
        let f = File::open(&p).unwrap();
        let mut buf = vec![0xAAu8; want.len()];
        let h = read_verified_fd(f.as_raw_fd(), None, Some(b"k"), &mut buf).unwrap();
        assert_eq!(buf, want);
        assert_eq!(h, verify_file(&p, None).unwrap());
        let mut short = vec![0u8; want.len() - 1];
        let e = read_verified_fd(f.as_raw_fd(), Some(&p), None, &mut short).unwrap_err();
        assert!(e.to_string().contains("did it change"), "{e}");
        assert!(matches!(
            read_verified_fd(f.as_raw_fd(), None, Some(b"x"), &mut buf),
            Err(Error::Authentication { .. })
        ));
        let mut m = want.clone();
        m[5000] ^= 1;
        std::fs::write(&p, &m).unwrap();
        assert!(matches!(
            read_verified_fd(f.as_raw_fd(), None, None, &mut buf),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            read_verified_fd(-1, None, None, &mut buf),
            Err(Error::InvalidArgument(_))
        ));
        let e = read_verified_fd(RawFd::MAX, None, None, &mut buf).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF), "{e}");
    }

    #[test]
    fn verify_an_open_descriptor() {
        let d = tempfile::tempdir().unwrap();
        let p = make_file(d.path(), "a.h5", &payload(9000), Some(b"k"));
        let f = File::open(&p).unwrap();
        // The open file is verified, whatever the name points to now.
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"replaced").unwrap();
        std::fs::rename(&junk, &p).unwrap();
        let h = verify_fd(f.as_raw_fd(), &p, Some(b"k")).unwrap();
        assert_eq!(h.batch_idx, 3);
        let other = make_file(d.path(), "b.h5", &payload(100), None);
        let g = File::open(&other).unwrap();
        let r = verify_fds(&[f.as_raw_fd(), g.as_raw_fd()], &[&p, &other], None);
        assert!(r[0].is_ok() && r[1].is_ok());
        assert!(matches!(
            verify_fd(g.as_raw_fd(), &other, Some(b"k")),
            Err(Error::Authentication { .. })
        ));
        assert!(matches!(
            verify_fd(-1, &p, None),
            Err(Error::InvalidArgument(_))
        ));
        let e = verify_fd(RawFd::MAX, &p, None).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF), "{e}");
    }

    #[test]
    fn keyed() {
        let d = tempfile::tempdir().unwrap();
        let k = make_file(d.path(), "k.h5", &payload(9000), Some(b"key"));
        let u = make_file(d.path(), "u.h5", &payload(9000), None);
        verify_file(&k, Some(b"key")).unwrap();
        verify_file(&k, None).unwrap();
        verify_file(&u, None).unwrap();
        assert!(matches!(
            verify_file(&k, Some(b"other")),
            Err(Error::Authentication { .. })
        ));
        assert!(matches!(
            verify_file(&u, Some(b"key")),
            Err(Error::Authentication { .. })
        ));
        assert!(matches!(
            read_verified(&k, Some(b"other")),
            Err(Error::Authentication { .. })
        ));
        assert!(matches!(
            read_verified(&u, Some(b"key")),
            Err(Error::Authentication { .. })
        ));
        assert!(read_verified(&k, Some(b"key")).is_ok());
        assert!(matches!(
            verify_file(&k, Some(b"")),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn missing_and_many() {
        let d = tempfile::tempdir().unwrap();
        let good = make_file(d.path(), "a.h5", &payload(100), None);
        let missing = d.path().join("missing.h5");
        let e = verify_file(&missing, None).unwrap_err();
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
        assert!(e.to_string().contains("missing.h5"));
        let r = verify_files(&[good.clone(), missing, good], None);
        assert!(r[0].is_ok() && r[1].is_err() && r[2].is_ok());
        assert!(matches!(
            verify_file(d.path(), None),
            Err(Error::Corrupt { .. })
        ));
    }
}
