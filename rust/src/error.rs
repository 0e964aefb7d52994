//! The one error type of the crate.
//!
//! Every variant keeps the path it is about, so that a message names the file and
//! says what went wrong with it. The Python binding maps the variants onto the
//! classes of `h5ckpt.errors`.
//!
//! This module depends on no other module of the crate (they all depend on it): a
//! value an error reports, such as the format version a reader knows, travels in
//! the error.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed (`op` names it: "open", "read", "write", ...).
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes are not an intact checkpoint.
    #[error("{}: {reason}", subject(path))]
    Corrupt { path: PathBuf, reason: String },
    /// A keyed reader found no HMAC tag, or one that does not match its key.
    #[error("{}: {reason}", subject(path))]
    Authentication { path: PathBuf, reason: String },
    /// The file uses a newer major format version than this reader knows.
    #[error(
        "{}: written in format version {major}.{minor}; this reader knows only major version {supported}",
        subject(path)
    )]
    Version {
        path: PathBuf,
        major: u16,
        minor: u16,
        /// The major version this reader knows.
        supported: u16,
    },
    /// An argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
}

fn subject(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        "checkpoint header".to_string()
    } else {
        format!("checkpoint {}", path.display())
    }
}

impl Error {
    /// An I/O error of operation `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A corruption error about `path` (empty when the bytes have no file yet).
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An authentication error about `path`.
    pub fn authentication(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Authentication {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An invalid argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Sets the path of an error that was produced without one (header parsing works
    /// on bytes); errors that already name a path keep it.
    pub fn with_path(mut self, new: &Path) -> Self {
        match &mut self {
            Error::Io { path, .. }
            | Error::Corrupt { path, .. }
            | Error::Authentication { path, .. }
            | Error::Version { path, .. } => {
                if path.as_os_str().is_empty() {
                    *path = new.to_path_buf();
                }
            }
            Error::InvalidArgument(_) => {}
        }
        self
    }

    /// The path the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Corrupt { path, .. }
            | Error::Authentication { path, .. }
            | Error::Version { path, .. } => {
                (!path.as_os_str().is_empty()).then_some(path.as_path())
            }
            Error::InvalidArgument(_) => None,
        }
    }

    /// The I/O error kind, for I/O errors.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The OS error number, for I/O errors that carry one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The class of `h5ckpt.errors` an operating-system error becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsClass {
    NotFound,
    /// Not allowed here, a read-only file system included: retrying as another
    /// user or elsewhere can help, a new disk cannot.
    Permission,
    /// The process ran out of something: nothing is wrong with the file.
    Resource,
    /// Everything else: the storage failed (full, I/O error, ...).
    Storage,
}

impl OsClass {
    /// The name of the class in `h5ckpt.errors`.
    pub fn class_name(self) -> &'static str {
        match self {
            OsClass::NotFound => "CheckpointNotFoundError",
            OsClass::Permission => "CheckpointPermissionError",
            OsClass::Resource => "CheckpointResourceError",
            OsClass::Storage => "CheckpointStorageError",
        }
    }
}

/// The one errno table of the package: the binding raises by it and the Python
/// layer (`staging.oserror_to_checkpoint`) reads it from the native module. An
/// errno not listed is a storage error.
pub const ERRNO_CLASSES: &[(i32, OsClass)] = &[
    (libc::ENOENT, OsClass::NotFound),
    (libc::EACCES, OsClass::Permission),
    (libc::EPERM, OsClass::Permission),
    (libc::EROFS, OsClass::Permission),
    (libc::ENOMEM, OsClass::Resource),
    (libc::EMFILE, OsClass::Resource),
    (libc::ENFILE, OsClass::Resource),
];

/// The class of an OS error: by its errno when it has one, else by its kind.
pub fn os_class(errno: Option<i32>, kind: io::ErrorKind) -> OsClass {
    if let Some(errno) = errno {
        return ERRNO_CLASSES
            .iter()
            .find(|(e, _)| *e == errno)
            .map_or(OsClass::Storage, |(_, class)| *class);
    }
    match kind {
        io::ErrorKind::NotFound => OsClass::NotFound,
        io::ErrorKind::PermissionDenied => OsClass::Permission,
        io::ErrorKind::OutOfMemory => OsClass::Resource,
        _ => OsClass::Storage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_path() {
        let e = Error::corrupt(
            "/x/y.h5",
            "payload digest mismatch (file changed or corrupted)",
        );
        assert_eq!(
            e.to_string(),
            "checkpoint /x/y.h5: payload digest mismatch (file changed or corrupted)"
        );
        let e = Error::io(
            "open",
            "/x/y.h5",
            io::Error::from_raw_os_error(2), // ENOENT
        );
        assert!(e.to_string().starts_with("cannot open /x/y.h5: "));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
        assert_eq!(e.errno(), Some(2));
    }

    #[test]
    fn with_path_fills_only_empty_paths() {
        let e = Error::corrupt("", "bad magic").with_path(Path::new("/a.h5"));
        assert_eq!(e.path(), Some(Path::new("/a.h5")));
        assert_eq!(e.to_string(), "checkpoint /a.h5: bad magic");
        let e = Error::corrupt("/b.h5", "x").with_path(Path::new("/a.h5"));
        assert_eq!(e.path(), Some(Path::new("/b.h5")));
        let e = Error::corrupt("", "bad magic");
        assert_eq!(e.to_string(), "checkpoint header: bad magic");
        assert_eq!(e.path(), None);
    }

    #[test]
    fn errno_table_decides_and_kind_is_the_fallback() {
        let class = |errno: i32| {
            let e = io::Error::from_raw_os_error(errno);
            os_class(e.raw_os_error(), e.kind())
        };
        assert_eq!(class(libc::EROFS), OsClass::Permission);
        assert_eq!(class(libc::EACCES), OsClass::Permission);
        assert_eq!(class(libc::EMFILE), OsClass::Resource);
        assert_eq!(class(libc::ENOMEM), OsClass::Resource);
        assert_eq!(class(libc::ENOSPC), OsClass::Storage);
        assert_eq!(class(libc::EIO), OsClass::Storage);
        assert_eq!(
            os_class(None, io::ErrorKind::PermissionDenied),
            OsClass::Permission
        );
        assert_eq!(
            os_class(None, io::ErrorKind::InvalidInput),
            OsClass::Storage
        );
    }
}
