//! The only place in sluice that talks to the kernel through raw syscalls.
//!
//! Everything here is a thin, safe wrapper: it takes borrowed file
//! descriptors, checks return values, and turns errors into `io::Error`.
//! Every `unsafe` block in the crate lives in this module and carries a
//! SAFETY comment saying why the call cannot violate memory safety. The
//! rest of the program (pumps, connections, workers) only calls these
//! wrappers, the way mio keeps its platform layer thin and the code above
//! it safe.

pub mod activation;
pub mod file;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Turn a `-1` return into the thread's `errno` as an `io::Error`.
fn cvt(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// send(2) `buf` to a non-blocking socket without SIGPIPE. `more` sets
/// MSG_MORE: TCP holds a partial segment back for what comes next (a
/// response head waits for the body's first bytes, a stream's last bytes
/// for its FIN), so both leave in one segment.
pub fn send(sock: BorrowedFd, buf: &[u8], more: bool) -> io::Result<usize> {
    let mut flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    if more {
        flags |= libc::MSG_MORE;
    }
    // SAFETY: `buf` is a live slice for the duration of the call.
    let ret = unsafe {
        libc::send(
            sock.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            flags,
        )
    };
    cvt(ret as libc::c_long)
}

/// splice(2) up to `len` bytes from `from` to `to`, never blocking.
///
/// One side must be a pipe. `more` sets SPLICE_F_MORE (more data follows),
/// which lets TCP hold a partial segment back. Returns the bytes moved; 0
/// means end of file on `from` when it is a socket or file.
pub fn splice(from: BorrowedFd, to: BorrowedFd, len: usize, more: bool) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if more {
        flags |= libc::SPLICE_F_MORE;
    }
    // SAFETY: both fds are borrowed, so they stay open for the call; null
    // offsets mean "use and advance the file position", which is what we
    // want for sockets and pipes. No user memory is passed to the kernel.
    let ret = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    cvt(ret as libc::c_long)
}

/// splice(2) from a file at `*offset` into a pipe; advances `*offset`.
pub fn splice_from_file(
    file: BorrowedFd,
    offset: &mut u64,
    pipe_wr: BorrowedFd,
    len: usize,
) -> io::Result<usize> {
    let mut off = *offset as libc::loff_t;
    // SAFETY: `off` is a live local the kernel reads and updates; the fds
    // are borrowed for the duration of the call.
    let ret = unsafe {
        libc::splice(
            file.as_raw_fd(),
            &mut off,
            pipe_wr.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    let n = cvt(ret as libc::c_long)?;
    *offset = off as u64;
    Ok(n)
}

/// A pipe's two ends, both non-blocking and close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    cvt(ret as libc::c_long)?;
    // SAFETY: pipe2 succeeded, so both fds are freshly opened and owned by
    // nobody else; wrapping them transfers ownership exactly once.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((rd, wr))
}

/// Ask for a pipe capacity of `size` bytes (F_SETPIPE_SZ) and return the
/// capacity the kernel actually granted (F_GETPIPE_SZ). A refusal (EPERM
/// over the per-user limit, EBUSY) keeps the old size and is not an error.
pub fn set_pipe_size(fd: BorrowedFd, size: usize) -> io::Result<usize> {
    let size = size.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: fcntl with an integer argument on a borrowed fd touches no
    // user memory.
    let _ = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    // SAFETY: as above.
    let got = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    cvt(got as libc::c_long)
}

/// sendfile(2) up to `len` bytes of `file` from `*offset` to `sock`;
/// advances `*offset`. 0 means the file ended before `*offset`.
pub fn sendfile(
    sock: BorrowedFd,
    file: BorrowedFd,
    offset: &mut u64,
    len: usize,
) -> io::Result<usize> {
    let mut off = *offset as libc::off_t;
    // SAFETY: `off` is a live local the kernel reads and updates; the fds
    // are borrowed for the duration of the call.
    let ret = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
    let n = cvt(ret as libc::c_long)?;
    *offset = off as u64;
    Ok(n)
}

/// Bytes a TCP socket has queued but the peer has not acknowledged yet
/// (SIOCOUTQ, the same request number as TIOCOUTQ).
pub fn unsent_bytes(sock: BorrowedFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points to
    // a live local; the fd is borrowed for the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    cvt(ret as libc::c_long)?;
    Ok(n.max(0) as usize)
}

/// Whether a TCP socket whose reads say end-of-stream was ended by a reset
/// and not a FIN, after `read` bytes were read from it, whichever syscall
/// took the reset's error (or none: splice(2) into a socket can take it in
/// one of its sends and still return the bytes it moved before). A reset
/// leaves the socket closed (TCP_CLOSE), and tcpi_bytes_received counts
/// every advance of the receive sequence, where a FIN takes one: exactly
/// `read` means no FIN came. No verdict (false) on a kernel too old to
/// report it.
pub fn ended_by_reset(sock: BorrowedFd, read: u64) -> io::Result<bool> {
    const TCP_CLOSE: u8 = 7;
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `ti`, a live
    // local of that size, and updates `len`; the fd is borrowed.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut ti as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    cvt(ret as libc::c_long)?;
    let known = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    Ok(len as usize >= known && ti.tcpi_state == TCP_CLOSE && ti.tcpi_bytes_received == read)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let lim = nofile_rlimit()?;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid, initialized rlimit struct.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } as libc::c_long)?;
        return Ok(raised.rlim_cur);
    }
    Ok(lim.rlim_cur)
}

/// The current (soft) limit on open file descriptors.
pub fn nofile_limit() -> io::Result<u64> {
    nofile_rlimit().map(|l| l.rlim_cur)
}

fn nofile_rlimit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit struct for the kernel to fill.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } as libc::c_long)?;
    Ok(lim)
}
