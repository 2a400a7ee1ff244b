//! Raw syscalls for file routes: openat2 beneath a root, mmap/munmap,
//! file leases with a real-time break signal.
//!
//! Like the rest of `sys`, every function here is a safe wrapper; the
//! `unsafe` blocks and their SAFETY arguments stay in this file. The one
//! subtle piece is `Mapping`: a read-only shared mapping of a file that
//! another process may truncate. sluice never dereferences it in user
//! space; its bytes are only handed to send(2), so a page that vanished
//! makes the kernel's copy fail with EFAULT instead of raising SIGBUS.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::cvt;

/// fcntl command to choose the signal sent for a lease break (x86_64 and
/// most architectures; libc does not export it for glibc targets).
const F_SETSIG: libc::c_int = 10;

/// The real-time signal that announces a lease break: SIGRTMIN+1 (glibc
/// keeps the first two for itself; SIGRTMIN() already skips them).
pub fn lease_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

/// Open `rel` (a relative path of plain components) beneath the directory
/// `root` with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): neither
/// `..` nor an absolute symlink nor a /proc magic link can leave `root`;
/// such a path fails with EXDEV or ELOOP. The file is opened read-only,
/// non-blocking (so a FIFO cannot stall the worker) and close-on-exec.
pub fn open_beneath(root: BorrowedFd, rel: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is a plain struct of integers (non_exhaustive in
    // libc, hence zeroed rather than a literal); all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is a NUL-terminated string and `how` a valid open_how
    // that both outlive the call; the size passed is the struct's size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = cvt(ret)?;
    // SAFETY: the syscall succeeded, so `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// What file routes need to know of a file: its identity and every
/// attribute an open(2) would check (to tell whether a path still names
/// the same, unchanged inode), its type, size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    /// Type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds; changes with any chmod, chown, ACL change,
    /// link count change or write.
    pub ctime: (i64, i64),
    pub size: u64,
    pub mtime: (i64, i64),
}

impl From<libc::stat> for FileStat {
    fn from(st: libc::stat) -> FileStat {
        FileStat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            ctime: (st.st_ctime, st.st_ctime_nsec),
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }
}

impl FileStat {
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// Same inode, unchanged in everything but its bytes and mtime.
    pub fn same_file(&self, other: &FileStat) -> bool {
        (
            self.dev, self.ino, self.mode, self.uid, self.gid, self.ctime,
        ) == (
            other.dev,
            other.ino,
            other.mode,
            other.uid,
            other.gid,
            other.ctime,
        )
    }

    pub fn modified(&self) -> std::time::SystemTime {
        use std::time::{Duration, UNIX_EPOCH};
        let (s, ns) = self.mtime;
        let secs = Duration::from_secs(s.unsigned_abs());
        let at = if s >= 0 {
            UNIX_EPOCH + secs
        } else {
            UNIX_EPOCH - secs
        };
        // The nanoseconds always count forward (-1.5 s is -2 s + 0.5 s).
        at + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
    }
}

/// fstat(2) of an open file.
pub fn fstat(fd: BorrowedFd) -> io::Result<FileStat> {
    nix::sys::stat::fstat(fd)
        .map(FileStat::from)
        .map_err(io::Error::from)
}

/// stat(2) of `rel` relative to the directory `dir` (or the working
/// directory with `None`), following symlinks as open does. Unlike
/// `open_beneath` it does not confine the walk: callers use it only to
/// check that a path still names a file they opened with confinement.
pub fn stat_at(dir: Option<BorrowedFd>, rel: &Path) -> io::Result<FileStat> {
    let dir = dir.unwrap_or(nix::fcntl::AT_FDCWD);
    nix::sys::stat::fstatat(dir, rel, nix::fcntl::AtFlags::empty())
        .map(FileStat::from)
        .map_err(io::Error::from)
}

/// Choose the signal the kernel sends when a lease on `fd` breaks.
pub fn set_lease_signal(fd: BorrowedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl with an integer argument on a borrowed fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), F_SETSIG, sig) } as libc::c_long).map(|_| ())
}

/// Take (F_RDLCK) or release (F_UNLCK) a lease on `fd`. Taking one fails
/// with EAGAIN while anyone has the file open for writing, and with EACCES
/// unless we own the file or hold CAP_LEASE.
pub fn set_lease(fd: BorrowedFd, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl with an integer argument on a borrowed fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, kind) } as libc::c_long).map(|_| ())
}

/// The lease held on `fd`: F_RDLCK while intact; during a break the
/// kernel reports the type it is breaking to (F_UNLCK for a read lease).
pub fn get_lease(fd: BorrowedFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl without argument on a borrowed fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) } as libc::c_long)
        .map(|v| v as libc::c_int)
}

/// A read-only, shared mapping of file bytes `[start, end)` (the start
/// rounded down to a page). Never read from in user space: `send_from`
/// passes it to the kernel only.
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
    /// File offset of the first mapped byte (page aligned).
    base: u64,
}

impl Mapping {
    /// Map file bytes `[start, end)` of `fd` (`start < end`).
    pub fn new(fd: BorrowedFd, start: u64, end: u64) -> io::Result<Mapping> {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let base = start - start % page;
        let len = end
            .checked_sub(base)
            .filter(|&l| l > 0)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = libc::off_t::try_from(base).map_err(io::Error::other)?;
        // SAFETY: a fresh mapping chosen by the kernel (addr = null), so no
        // existing memory is affected; the fd is borrowed for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len, base })
    }

    /// send(2) up to `len` bytes of the file from offset `off` to `sock`
    /// (non-blocking, no SIGPIPE). Bytes beyond the mapping are never
    /// asked for. If the file was truncated under the mapping, the
    /// kernel's copy faults on the missing page and send fails with
    /// EFAULT (or returns the bytes before it): no SIGBUS, because user
    /// space never touches the pages.
    pub fn send_from(&self, sock: BorrowedFd, off: u64, len: usize) -> io::Result<usize> {
        let Some(off) = off
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o < self.len)
        else {
            return Ok(0);
        };
        let len = len.min(self.len - off);
        // SAFETY: `off < self.len` and `len <= self.len - off`, so the range
        // lies inside our live mapping (unmapped only in Drop). The pointer
        // is handed to the kernel, which validates every page itself and
        // reports a vanished page (file truncated) as EFAULT; no Rust
        // reference to the memory is ever created, so no SIGBUS can hit
        // user-space code.
        let ret = unsafe {
            libc::send(
                sock.as_raw_fd(),
                (self.ptr as *const u8).add(off) as *const libc::c_void,
                len,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        cvt(ret as libc::c_long)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing refers to
        // the mapping after this (it is only ever passed to send).
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

// SAFETY: the mapping is a plain address range owned by this value; it is
// never dereferenced in user space, so moving it across threads is sound.
unsafe impl Send for Mapping {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn temp_file(name: &str, data: &[u8]) -> (std::path::PathBuf, std::fs::File) {
        let p = std::env::temp_dir().join(format!("sluice-sys-{name}-{}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        (p, f)
    }

    /// A mapping whose file was truncated: sending from it fails with
    /// EFAULT (or sends only what still exists); the process gets no SIGBUS.
    #[test]
    fn truncated_mapping_is_efault_not_sigbus() {
        let data = vec![7u8; 3 * 4096];
        let (p, f) = temp_file("efault", &data);
        let m = Mapping::new(f.as_fd(), 0, data.len() as u64).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        assert_eq!(m.send_from(a.as_fd(), 0, 100).unwrap(), 100);
        let mut got = [0u8; 100];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, [7u8; 100]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        let r = m.send_from(a.as_fd(), 4096, 4096);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EFAULT));
        // Past the mapping nothing is sent at all.
        assert_eq!(m.send_from(a.as_fd(), data.len() as u64, 10).unwrap(), 0);
        drop(m);
        // A mapping of a later part of a file maps from its page.
        std::fs::write(&p, &data).unwrap();
        let m = Mapping::new(f.as_fd(), 5000, 6000).unwrap();
        assert_eq!(
            m.send_from(a.as_fd(), 4095, 10).unwrap(),
            0,
            "before the page"
        );
        assert_eq!(m.send_from(a.as_fd(), 5000, 10_000).unwrap(), 1000);
        let mut got = vec![0u8; 1000];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, vec![7u8; 1000]);
        drop(m);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn lease_needs_no_writer() {
        let (p, f) = temp_file("lease", b"x");
        set_lease_signal(f.as_fd(), lease_signal()).unwrap();
        // Nobody writes: the lease is granted (we own the file).
        set_lease(f.as_fd(), libc::F_RDLCK).unwrap();
        assert_eq!(get_lease(f.as_fd()).unwrap(), libc::F_RDLCK);
        set_lease(f.as_fd(), libc::F_UNLCK).unwrap();
        assert_eq!(get_lease(f.as_fd()).unwrap(), libc::F_UNLCK);
        // A writer (this process) makes it EAGAIN, even for root.
        let w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let e = set_lease(f.as_fd(), libc::F_RDLCK).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        drop(w);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn open_beneath_stays_beneath() {
        let d = std::env::temp_dir().join(format!("sluice-sys-beneath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root")).unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::fs::write(d.join("root/ok"), b"o").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("root/abs")).unwrap();
        std::os::unix::fs::symlink("../secret", d.join("root/rel")).unwrap();
        let root = std::fs::File::open(d.join("root")).unwrap();
        assert!(open_beneath(root.as_fd(), Path::new("ok")).is_ok());
        for bad in [
            "../secret",
            "abs",
            "rel",
            "/etc/passwd",
            "/proc/self/root/etc/passwd",
        ] {
            let e = open_beneath(root.as_fd(), Path::new(bad)).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::EXDEV | libc::ELOOP)),
                "{bad}: {e}"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
