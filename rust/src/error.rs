//! The one error type of the crate.
//!
//! Every variant keeps the path it is about, so that a message names the file and
//! says what went wrong with it. The Python binding maps the variants onto the
//! classes of `h5ckpt.errors`.

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
        "{}: written in format version {major}.{minor}; this reader knows only major version {}",
        subject(path),
        crate::header::FORMAT_MAJOR
    )]
    Version {
        path: PathBuf,
        major: u16,
        minor: u16,
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
}
