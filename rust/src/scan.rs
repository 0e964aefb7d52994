//! Listing the checkpoints of a directory: `{prefix}_batch_<digits>.h5`, regular
//! files only, the first 512 bytes of each read in parallel.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::header::{self, Header, HDF5_SIGNATURE, HEADER_SIZE, MAGIC};
use crate::verify::{check_length, read_prefix};

/// What a matching file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Starts with the h5ckpt magic.
    H5ckpt,
    /// Starts with the plain HDF5 signature (a file written without our header).
    Legacy,
    /// Anything else, including files shorter than 8 bytes and unreadable files.
    Foreign,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::H5ckpt => "h5ckpt",
            Kind::Legacy => "legacy",
            Kind::Foreign => "foreign",
        }
    }
}

/// One matching file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: PathBuf,
    pub name: String,
    pub batch_idx: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
    pub device: u64,
    pub kind: Kind,
    /// The parsed header, for an h5ckpt file whose header and length check out.
    pub header: Option<Header>,
    /// Why the file is not a well-formed h5ckpt file or could not be read; `None`
    /// for a good h5ckpt header and for legacy and foreign files that were read.
    pub error: Option<String>,
}

/// The batch index of a name `{prefix}_batch_<one or more ASCII digits>.h5`.
pub fn parse_name(name: &str, prefix: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(prefix)?
        .strip_prefix("_batch_")?
        .strip_suffix(".h5")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lists `directory`: the matching regular files (symlinks and directories are
/// skipped), sorted by `(batch_idx, name)`. Files that vanish while being listed are
/// skipped; files that cannot be read are listed with `error` set.
///
/// Each candidate costs `openat` (relative to the directory, `O_NOFOLLOW`), `fstat`,
/// one 512-byte `pread` and `close`; names whose directory entry already says
/// "symlink" or "directory" cost nothing.
pub fn scan(directory: &Path, prefix: &str) -> Result<Vec<Entry>> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(directory)
        .map_err(|e| Error::io("list", directory, e))?;
    let read_dir = std::fs::read_dir(directory).map_err(|e| Error::io("list", directory, e))?;
    let mut names = Vec::new();
    for dirent in read_dir {
        let dirent = dirent.map_err(|e| Error::io("list", directory, e))?;
        let Ok(name) = dirent.file_name().into_string() else {
            continue;
        };
        let Some(batch_idx) = parse_name(&name, prefix) else {
            continue;
        };
        // `file_type` comes from the directory entry (no syscall) where the file
        // system fills it in; `examine` checks the opened file again anyway.
        if let Ok(t) = dirent.file_type() {
            if t.is_symlink() || t.is_dir() {
                continue;
            }
        }
        names.push((batch_idx, name));
    }
    let mut entries: Vec<Entry> = names
        .into_par_iter()
        .filter_map(|(batch_idx, name)| examine(&dir, directory, name, batch_idx))
        .collect();
    entries.sort_by(|a, b| (a.batch_idx, &a.name).cmp(&(b.batch_idx, &b.name)));
    Ok(entries)
}

/// Opens `name` in the directory `dir` without following a symlink and without
/// blocking on a FIFO.
fn open_in(dir: &File, name: &str) -> io::Result<File> {
    let c_name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: `dir` is an open directory descriptor and `c_name` a NUL-terminated
    // string, both alive for the call; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c_name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: `fd` is open and owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads one candidate; `None` when it is not a regular file or has vanished.
fn examine(dir: &File, directory: &Path, name: String, batch_idx: u64) -> Option<Entry> {
    let path = directory.join(&name);
    let file = match open_in(dir, &name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        // A symlink (O_NOFOLLOW).
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return None,
        Err(e) => {
            // Unreadable: list it with what `lstat` still tells, unless it is not a
            // regular file after all.
            return match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_file() => {
                    Some(unreadable(path, name, batch_idx, Some(&m), "open", e))
                }
                Ok(_) => None,
                Err(s) if s.kind() == io::ErrorKind::NotFound => None,
                Err(_) => Some(unreadable(path, name, batch_idx, None, "open", e)),
            };
        }
    };
    let meta = match file.metadata() {
        Ok(m) if m.file_type().is_file() => m,
        Ok(_) => return None,
        Err(e) => return Some(unreadable(path, name, batch_idx, None, "stat", e)),
    };
    let mut entry = Entry {
        path,
        name,
        batch_idx,
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        inode: meta.ino(),
        device: meta.dev(),
        kind: Kind::Foreign,
        header: None,
        error: None,
    };
    classify(&file, &mut entry);
    Some(entry)
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn unreadable(
    path: PathBuf,
    name: String,
    batch_idx: u64,
    meta: Option<&std::fs::Metadata>,
    op: &'static str,
    e: io::Error,
) -> Entry {
    let error = Error::io(op, &path, e).to_string();
    Entry {
        size: meta.map_or(0, |m| m.len()),
        mtime_ns: meta.map_or(0, mtime_ns),
        inode: meta.map_or(0, |m| m.ino()),
        device: meta.map_or(0, |m| m.dev()),
        path,
        name,
        batch_idx,
        kind: Kind::Foreign,
        header: None,
        error: Some(error),
    }
}

fn classify(file: &File, entry: &mut Entry) {
    let mut bytes = [0u8; HEADER_SIZE];
    let got = match read_prefix(file, &mut bytes, &entry.path) {
        Ok(n) => n,
        Err(e) => {
            entry.error = Some(e.to_string());
            return;
        }
    };
    let bytes = &bytes[..got];
    if bytes.starts_with(&MAGIC) {
        entry.kind = Kind::H5ckpt;
        let parsed = header::parse(bytes)
            .map_err(|e| e.with_path(&entry.path))
            .and_then(|h| check_length(&h, entry.size, &entry.path).map(|()| h));
        match parsed {
            Ok(h) => entry.header = Some(h),
            Err(e) => entry.error = Some(e.to_string()),
        }
    } else if bytes.starts_with(&HDF5_SIGNATURE) {
        entry.kind = Kind::Legacy;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tests::make_file;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("run_batch_12.h5", "run"), Some(12));
        assert_eq!(parse_name("run_batch_007.h5", "run"), Some(7));
        assert_eq!(parse_name("run_batch_0.h5", "run"), Some(0));
        assert_eq!(parse_name("_batch_5.h5", ""), Some(5));
        assert_eq!(
            parse_name("run_batch_18446744073709551615.h5", "run"),
            Some(u64::MAX)
        );
        for bad in [
            "run_batch_18446744073709551616.h5",
            "run_batch_.h5",
            "run_batch_1.h5.tmp",
            ".run_batch_1.h5",
            "run_batch_-1.h5",
            "run_batch_+1.h5",
            "run_batch_1a.h5",
            "run_batch_1 .h5",
            "run_batch_١.h5",
            "run_batch_1.H5",
            "runx_batch_1.h5",
            "run_batch_1.hdf5",
            "other_batch_1.h5",
        ] {
            assert_eq!(parse_name(bad, "run"), None, "{bad}");
        }
    }

    #[test]
    fn scan_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        make_file(dir, "ck_batch_10.h5", b"payload", None);
        make_file(dir, "ck_batch_2.h5", b"p", Some(b"k"));
        let bad = make_file(dir, "ck_batch_3.h5", b"payload", None);
        let mut b = std::fs::read(&bad).unwrap();
        b.push(1);
        std::fs::write(&bad, b).unwrap();
        let mut legacy = HDF5_SIGNATURE.to_vec();
        legacy.extend_from_slice(&[0; 100]);
        std::fs::write(dir.join("ck_batch_4.h5"), legacy).unwrap();
        std::fs::write(dir.join("ck_batch_5.h5"), b"hello").unwrap();
        std::fs::write(dir.join("ck_batch_6.h5"), b"").unwrap();
        std::fs::write(dir.join("ck_batch_7.h5"), &MAGIC[..5]).unwrap();
        std::fs::write(dir.join("ck_batch_x.h5"), b"").unwrap();
        std::fs::write(dir.join("other_batch_1.h5"), b"").unwrap();
        std::fs::create_dir(dir.join("ck_batch_8.h5")).unwrap();
        std::os::unix::fs::symlink(dir.join("ck_batch_10.h5"), dir.join("ck_batch_9.h5")).unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("ck_batch_11.h5")).unwrap();
        make_file(dir, "ck_batch_010.h5", b"x", None);

        let e = scan(dir, "ck").unwrap();
        let got: Vec<(&str, u64, &str, bool, bool)> = e
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    e.batch_idx,
                    e.kind.as_str(),
                    e.header.is_some(),
                    e.error.is_some(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("ck_batch_2.h5", 2, "h5ckpt", true, false),
                ("ck_batch_3.h5", 3, "h5ckpt", false, true),
                ("ck_batch_4.h5", 4, "legacy", false, false),
                ("ck_batch_5.h5", 5, "foreign", false, false),
                ("ck_batch_6.h5", 6, "foreign", false, false),
                ("ck_batch_7.h5", 7, "foreign", false, false),
                ("ck_batch_010.h5", 10, "h5ckpt", true, false),
                ("ck_batch_10.h5", 10, "h5ckpt", true, false),
            ]
        );
        assert!(e[1].error.as_deref().unwrap().contains("extra bytes"));
        assert!(e[0].header.as_ref().unwrap().keyed());
        assert_eq!(e[0].size, 513);
        assert_eq!(e[7].path, dir.join("ck_batch_10.h5"));
        let m = std::fs::metadata(dir.join("ck_batch_10.h5")).unwrap();
        assert_eq!(e[7].inode, m.ino());
        assert_eq!(e[7].device, m.dev());
        assert_eq!(e[7].mtime_ns, mtime_ns(&m));
        assert!(e[7].mtime_ns > 0);

        assert!(scan(dir, "nothing").unwrap().is_empty());
        let err = scan(&dir.join("missing"), "ck").unwrap_err();
        assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn fifo_and_dangling_names_are_skipped_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        make_file(dir, "ck_batch_1.h5", b"x", None);
        let fifo = std::ffi::CString::new(dir.join("ck_batch_2.h5").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink(dir.join("ck_batch_1.h5"), dir.join("ck_batch_3.h5")).unwrap();
        std::fs::create_dir(dir.join("ck_batch_4.h5")).unwrap();
        let e = scan(dir, "ck").unwrap();
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["ck_batch_1.h5"]);
        assert!(e[0].header.is_some() && e[0].error.is_none());
    }

    #[test]
    fn unreadable_file_is_listed_with_error() {
        // Root reads everything, so this only tests something as a normal user.
        let d = tempfile::tempdir().unwrap();
        let p = make_file(d.path(), "ck_batch_1.h5", b"x", None);
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let e = scan(d.path(), "ck").unwrap();
        assert_eq!(e.len(), 1);
        if File::open(&p).is_err() {
            assert!(e[0].error.is_some());
            assert_eq!(e[0].kind, Kind::Foreign);
        } else {
            assert!(e[0].header.is_some());
        }
    }

    proptest! {
        #[test]
        fn names_roundtrip(prefix in "[a-zA-Z0-9_.-]{0,12}", n in any::<u64>()) {
            prop_assert_eq!(parse_name(&format!("{prefix}_batch_{n}.h5"), &prefix), Some(n));
        }

        #[test]
        fn parse_name_never_panics(name in "\\PC{0,30}", prefix in "\\PC{0,5}") {
            let _ = parse_name(&name, &prefix);
        }
    }
}
