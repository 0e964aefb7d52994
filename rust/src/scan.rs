//! Listing the checkpoints of a directory: `{prefix}_batch_<digits>.h5`, regular
//! files only, the first 512 bytes of each read in parallel.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

/// What tells one version of a file from another without reading it. The change
/// time is part of it because no system call can set it back: a file rewritten in
/// place and given its old mtime again still gets a new ctime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Identity {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    #[allow(clippy::unnecessary_cast)] // the stat field types differ between targets
    fn of_stat(st: &libc::stat) -> Self {
        Identity {
            device: st.st_dev as u64,
            inode: st.st_ino as u64,
            size: st.st_size as u64,
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        }
    }
}

/// One matching file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: PathBuf,
    pub name: String,
    pub batch_idx: u64,
    pub identity: Identity,
    pub kind: Kind,
    /// The parsed header, for an h5ckpt file whose header and length check out.
    pub header: Option<Header>,
    /// Why the file is not a well-formed h5ckpt file or could not be read; `None`
    /// for a good h5ckpt header and for legacy and foreign files that were read.
    pub error: Option<String>,
    /// Whether `error` is a failure to read the file (an I/O error, no descriptor
    /// left, ...), which says nothing of what the file holds.
    pub unread: bool,
}

impl Kind {
    /// What a file holds, from its first bytes (the whole file if it is shorter
    /// than the signatures): the one format check of the package.
    pub fn of_head(head: &[u8]) -> Kind {
        if head.starts_with(&MAGIC) {
            Kind::H5ckpt
        } else if head.starts_with(&HDF5_SIGNATURE) {
            Kind::Legacy
        } else {
            Kind::Foreign
        }
    }
}

/// The batch index written as `<one or more ASCII digits>` that fits a `u64`.
fn batch_digits(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The batch index of a name `{prefix}_batch_<one or more ASCII digits>.h5`; the
/// one definition of a checkpoint's file name (the Python layer calls it too).
pub fn parse_name(name: &str, prefix: &str) -> Option<u64> {
    batch_digits(
        name.strip_prefix(prefix)?
            .strip_prefix("_batch_")?
            .strip_suffix(".h5")?,
    )
}

/// `(prefix, batch index)` of a checkpoint name of any non-empty prefix: the
/// prefix runs to the last `_batch_`, as only that one can be followed by digits
/// alone.
pub fn parse_any_name(name: &str) -> Option<(&str, u64)> {
    let stem = name.strip_suffix(".h5")?;
    let at = stem.rfind("_batch_")?;
    let prefix = &stem[..at];
    if prefix.is_empty() {
        return None;
    }
    Some((prefix, batch_digits(&stem[at + "_batch_".len()..])?))
}

/// The file name of the checkpoint of `batch_idx`: at least four digits.
pub fn checkpoint_name(prefix: &str, batch_idx: u64) -> String {
    format!("{prefix}_batch_{batch_idx:04}.h5")
}

/// One file of a [`rescan`].
#[derive(Debug)]
pub enum Found {
    /// The file has the identity the caller knew it by; carries the caller's token.
    Unchanged(usize),
    /// The file, read now.
    Read(Box<Entry>),
}

/// Lists `directory`: the matching regular files (symlinks and directories are
/// skipped), sorted by `(batch_idx, name)`. Files that vanish while being listed are
/// skipped; files that cannot be read are listed with `error` set.
///
/// `known(batch_idx, name)` returns `(token, identity)` of a file the caller read
/// before. A file that still has that identity (one `fstatat`, without opening it)
/// is reported as `Found::Unchanged(token)` and not read again, so listing an
/// unchanged directory costs one system call per file. Every other candidate costs
/// `openat` (relative to the directory, `O_NOFOLLOW`), `fstat`, one 512-byte `pread`
/// and `close`; names whose directory entry already says "symlink" or "directory"
/// cost nothing.
pub fn rescan<F>(directory: &Path, prefix: &str, known: F) -> Result<Vec<Found>>
where
    F: Fn(u64, &str) -> Option<(usize, Identity)> + Sync,
{
    let dir = open_directory(directory)?;
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
    // Sorted before the parallel pass, whose collect keeps the order.
    names.sort_unstable();
    // Few files: one stat each (a header read for a new one), quicker here than
    // handed to the pool.
    let found = crate::parallel::map_all(names, 16, |(batch_idx, name)| {
        match known(batch_idx, &name) {
            Some((token, identity)) if lstat_in(&dir, &name) == Some(identity) => {
                Some(Found::Unchanged(token))
            }
            _ => examine(&dir, directory, name, batch_idx).map(|e| Found::Read(Box::new(e))),
        }
    });
    Ok(found.into_iter().flatten().collect())
}

/// The entry of one file of `directory` named like a checkpoint of `prefix`, read
/// now; `None` when there is no such regular file.
pub fn examine_name(directory: &Path, prefix: &str, name: &str) -> Result<Option<Entry>> {
    let Some(batch_idx) = parse_name(name, prefix) else {
        return Ok(None);
    };
    let dir = open_directory(directory)?;
    Ok(examine(&dir, directory, name.to_owned(), batch_idx))
}

fn open_directory(directory: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(directory)
        .map_err(|e| Error::io("list", directory, e))
}

/// The identity of the regular file `name` in `dir`, without following a symlink;
/// `None` for anything else or on any error.
fn lstat_in(dir: &File, name: &str) -> Option<Identity> {
    let c_name = CString::new(name).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `dir` is an open directory, `c_name` NUL-terminated and `st` writable
    // memory for one `stat`, all alive for the call.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c_name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    (st.st_mode & libc::S_IFMT == libc::S_IFREG).then(|| Identity::of_stat(&st))
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
        identity: Identity::of(&meta),
        kind: Kind::Foreign,
        header: None,
        error: None,
        unread: false,
    };
    classify(&file, &mut entry);
    Some(entry)
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
        identity: meta.map(Identity::of).unwrap_or_default(),
        path,
        name,
        batch_idx,
        kind: Kind::Foreign,
        header: None,
        error: Some(error),
        unread: true,
    }
}

fn classify(file: &File, entry: &mut Entry) {
    let mut bytes = [0u8; HEADER_SIZE];
    let got = match read_prefix(file, &mut bytes, &entry.path) {
        Ok(n) => n,
        Err(e) => {
            entry.error = Some(e.to_string());
            entry.unread = true;
            return;
        }
    };
    let bytes = &bytes[..got];
    entry.kind = Kind::of_head(bytes);
    if entry.kind == Kind::H5ckpt {
        let parsed = header::parse(bytes)
            .map_err(|e| e.with_path(&entry.path))
            .and_then(|h| check_length(&h, entry.identity.size, &entry.path).map(|()| h));
        match parsed {
            Ok(h) => entry.header = Some(h),
            Err(e) => entry.error = Some(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tests::make_file;
    use proptest::prelude::*;

    /// Every matching file of `directory`, read now (none known before).
    fn read_all(directory: &Path, prefix: &str) -> Result<Vec<Entry>> {
        Ok(rescan(directory, prefix, |_, _| None)?
            .into_iter()
            .map(|f| match f {
                Found::Read(entry) => *entry,
                Found::Unchanged(_) => panic!("nothing was known"),
            })
            .collect())
    }

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
            assert_ne!(parse_any_name(bad).map(|(p, _)| p), Some("run"), "{bad}");
        }
    }

    #[test]
    fn names_of_any_prefix() {
        assert_eq!(parse_any_name("run_batch_0012.h5"), Some(("run", 12)));
        assert_eq!(
            parse_any_name("a_batch_1_batch_2.h5"),
            Some(("a_batch_1", 2))
        );
        assert_eq!(parse_any_name("my run_batch_3.h5"), Some(("my run", 3)));
        for bad in [
            "_batch_5.h5",
            "run_batch_1.h5\n",
            "run_batch_1_batch_x.h5",
            "run_batch_١.h5",
            "run_batch_99999999999999999999.h5",
        ] {
            assert_eq!(parse_any_name(bad), None, "{bad:?}");
        }
        assert_eq!(checkpoint_name("run", 7), "run_batch_0007.h5");
        assert_eq!(checkpoint_name("run", 123_456), "run_batch_123456.h5");
    }

    #[test]
    fn kinds_from_first_bytes() {
        assert_eq!(Kind::of_head(&MAGIC), Kind::H5ckpt);
        assert_eq!(Kind::of_head(&HDF5_SIGNATURE), Kind::Legacy);
        assert_eq!(Kind::of_head(&MAGIC[..7]), Kind::Foreign);
        assert_eq!(Kind::of_head(b""), Kind::Foreign);
        assert_eq!(Kind::of_head(b"PK\x03\x04zipzip"), Kind::Foreign);
    }

    #[test]
    fn list_directory() {
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

        let e = read_all(dir, "ck").unwrap();
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
        assert_eq!(e[0].identity.size, 513);
        assert_eq!(e[7].path, dir.join("ck_batch_10.h5"));
        let m = std::fs::metadata(dir.join("ck_batch_10.h5")).unwrap();
        assert_eq!(e[7].identity, Identity::of(&m));
        assert_eq!(e[7].identity.inode, m.ino());
        assert!(e[7].identity.mtime_ns > 0 && e[7].identity.ctime_ns > 0);

        assert!(read_all(dir, "nothing").unwrap().is_empty());
        let err = read_all(&dir.join("missing"), "ck").unwrap_err();
        assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn rescan_reads_only_what_changed() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        make_file(dir, "ck_batch_1.h5", b"one", None);
        make_file(dir, "ck_batch_2.h5", b"two", None);
        let first = read_all(dir, "ck").unwrap();
        let by_name = |batch: u64, name: &str| {
            let i = first.iter().position(|e| e.name == name)?;
            assert_eq!(first[i].batch_idx, batch);
            Some((100 + i, first[i].identity))
        };
        let tokens = |found: Vec<Found>| -> Vec<Option<usize>> {
            found
                .iter()
                .map(|f| match f {
                    Found::Unchanged(t) => Some(*t),
                    Found::Read(_) => None,
                })
                .collect()
        };
        assert_eq!(
            tokens(rescan(dir, "ck", by_name).unwrap()),
            vec![Some(100), Some(101)]
        );

        // A changed file (appended to), a replaced one and a new one are read.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join("ck_batch_1.h5"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"!").unwrap();
        drop(f);
        std::fs::remove_file(dir.join("ck_batch_2.h5")).unwrap();
        make_file(dir, "ck_batch_2.h5", b"two", None);
        make_file(dir, "ck_batch_3.h5", b"three", None);
        let found = rescan(dir, "ck", by_name).unwrap();
        assert_eq!(tokens(rescan(dir, "ck", by_name).unwrap()), vec![None; 3]);
        let again: Vec<Entry> = found
            .into_iter()
            .map(|f| match f {
                Found::Read(e) => *e,
                Found::Unchanged(_) => panic!("a changed file was not read"),
            })
            .collect();
        let kinds: Vec<(&str, Kind)> = again.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                ("ck_batch_1.h5", Kind::H5ckpt),
                ("ck_batch_2.h5", Kind::H5ckpt),
                ("ck_batch_3.h5", Kind::H5ckpt)
            ]
        );
        assert!(again[0].error.as_deref().unwrap().contains("extra bytes"));
        assert!(again[1].header.is_some() && again[1].error.is_none());

        // A symlink put where a known file was is not followed.
        let known = again;
        std::fs::remove_file(dir.join("ck_batch_3.h5")).unwrap();
        std::os::unix::fs::symlink(dir.join("ck_batch_2.h5"), dir.join("ck_batch_3.h5")).unwrap();
        let with_3 = |_: u64, name: &str| {
            let i = known.iter().position(|e| e.name == name)?;
            Some((i, known[i].identity))
        };
        assert_eq!(
            tokens(rescan(dir, "ck", with_3).unwrap()),
            vec![Some(0), Some(1)]
        );
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
        let e = read_all(dir, "ck").unwrap();
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
        let e = read_all(d.path(), "ck").unwrap();
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
            prop_assert_eq!(parse_name(&checkpoint_name(&prefix, n), &prefix), Some(n));
        }

        #[test]
        fn any_prefix_agrees_with_prefix(prefix in "[a-z_]{1,8}", n in any::<u64>()) {
            let name = checkpoint_name(&prefix, n);
            prop_assert_eq!(parse_any_name(&name), Some((prefix.as_str(), n)));
        }

        #[test]
        fn parse_name_never_panics(name in "\\PC{0,30}", prefix in "\\PC{0,5}") {
            let _ = parse_name(&name, &prefix);
        }
    }
}
