//! File descriptors that a caller owns and lends to one call: the `*_fd` functions
//! work on files that Python code opened and keeps open (and closes) itself.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Runs `f` on the open file `fd`, which the caller owns and keeps open until this
/// returns; `path` names it in messages. Lending the descriptor neither closes nor
/// changes it (what `f` does with the file is up to `f`).
///
/// A negative descriptor is an invalid argument; one that is not open in this
/// process is the OS error EBADF (operation "use"), found before anything uses it.
pub fn with_borrowed_file<T>(
    fd: RawFd,
    path: &Path,
    f: impl FnOnce(&File) -> Result<T>,
) -> Result<T> {
    if fd < 0 {
        return Err(Error::invalid(format!("invalid file descriptor {fd}")));
    }
    // SAFETY: fcntl(F_GETFD) only reads the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(Error::io("use", path, io::Error::last_os_error()));
    }
    // SAFETY: the one place where the crate makes a `File` of a descriptor it does
    // not own. `fd` is open (checked just above) and stays open for the whole call,
    // because the caller owns it and lends it for the call: the contract of every
    // `*_fd` function. ManuallyDrop keeps this `File` from closing it, and `f` gets
    // only a shared reference, so it can neither drop the `File` nor move it out.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    f(&file)
}

/// A name for `fd` in messages: the path it was opened with, when the OS tells.
pub fn path_of(fd: RawFd) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap_or_else(|_| PathBuf::from(format!("<file descriptor {fd}>")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn lends_an_open_file_and_leaves_it_open() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        let file = File::open(&p).unwrap();
        let len = with_borrowed_file(file.as_raw_fd(), &p, |f| {
            Ok(f.metadata().map_err(|e| Error::io("stat", &p, e))?.len())
        })
        .unwrap();
        assert_eq!(len, 5);
        // Still open: the lent `File` did not close it.
        assert_eq!(file.metadata().unwrap().len(), 5);
        assert_eq!(path_of(file.as_raw_fd()), p.canonicalize().unwrap());
    }

    #[test]
    fn refuses_negative_and_unopened_descriptors_before_using_them() {
        let p = Path::new("<test>");
        let never = |_: &File| -> Result<()> { panic!("a bad descriptor was used") };
        let e = with_borrowed_file(-1, p, never).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        // Above any limit of open files: never open, whatever other tests open
        // meanwhile.
        let unopened = RawFd::MAX;
        let e = with_borrowed_file(unopened, p, never).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF), "{e}");
        assert!(e.to_string().starts_with("cannot use <test>: "), "{e}");
        assert_eq!(
            path_of(unopened),
            PathBuf::from(format!("<file descriptor {unopened}>"))
        );
    }
}
