//! Sending a file's bytes to a socket: one small interface, four
//! strategies.
//!
//! A `Body` holds an open file (shared with the worker's open-file cache,
//! except under mmap) and sends bytes `[pos, end)` of it to a
//! non-blocking socket, at most `budget` per call, with the route's
//! strategy:
//!
//! - `sendfile`: sendfile(2), the page cache straight to the socket.
//! - `mmap`: the file mapped read-only under a read lease (F_SETLEASE
//!   F_RDLCK, break announced by a real-time signal set with F_SETSIG);
//!   bytes go from the mapping to send(2) and are never read in user space,
//!   so a truncated page is an EFAULT, not a SIGBUS. When the lease breaks
//!   the worker sees the signal, `lease_broken` says so, and the session
//!   ends the transfer; `finish` unmaps, then releases the lease. Without a
//!   lease (file open for writing elsewhere, not ours, no CAP_LEASE, no
//!   signal handler) the body uses sendfile instead and says why.
//! - `splice`: file → pipe → socket, with a pipe from the worker's pool
//!   (sendfile when the pool is empty, and for the rest of a body whose
//!   file would not fill the empty pipe: EAGAIN there has no readiness
//!   event to wait for, and retrying would spin).
//! - `copy`: pread(2) into a pooled buffer, write(2) from it.
//!
//! Every strategy reports a file that ended before `end` as `Shrunk`
//! (sendfile/splice/pread returning 0, send from the mapping faulting), so
//! a truncated file ends the transfer instead of hanging or spinning.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use mio::net::TcpStream;

use super::Pools;
use crate::config::FileStrategy;
use crate::pipe_pool::Pipe;
use crate::sys;
use crate::sys::file::Mapping;

thread_local! {
    /// Set on a worker thread once it watches the lease-break signal (the
    /// handler is installed and the worker's poll wakes on it). A worker
    /// without it takes no lease: nobody would answer the break, and an
    /// unhandled real-time signal would end the process.
    static LEASE_WATCHED: Cell<bool> = const { Cell::new(false) };
}

/// Called by a worker thread once it watches the lease-break signal.
pub fn lease_watched() {
    LEASE_WATCHED.with(|w| w.set(true));
}

/// Per-route settings a body needs.
#[derive(Debug, Clone, Copy)]
pub struct BodyParams {
    pub strategy: FileStrategy,
    pub pipe_size: usize,
    pub buffer_size: usize,
}

/// Why a body does not use the strategy the route asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFallback {
    /// mmap: no read lease could be taken.
    NoLease,
    /// splice: the pipe pool was empty.
    NoPipe,
    /// splice: the file would not fill the pipe (EAGAIN with the pipe
    /// empty); retrying would spin, so the rest went with sendfile.
    FileBlocked,
}

impl BodyFallback {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyFallback::NoLease => "no_lease",
            BodyFallback::NoPipe => "no_pipe",
            BodyFallback::FileBlocked => "file_blocked",
        }
    }
}

/// How a `send` call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Every byte up to `end` has reached the socket.
    Done,
    /// The budget is spent; the socket may still take more.
    Budget,
    /// The socket is full: wait for it to be writable.
    Blocked,
    /// The file ended before `end` (truncated under us).
    Shrunk,
    /// Reading the file failed (EIO from a failing disk, a network
    /// filesystem gone away), with this errno: the client is not to blame.
    FileError(i32),
}

/// The file's errno, if a failed sendfile(2) (which reports the file's
/// errors and the socket's alike) or an mmap send failed because of the
/// file. Errnos only a socket gives, and those only a file gives, decide
/// at once; any other (a vanished peer's socket reports the last ICMP
/// error it got: ECONNREFUSED, EPROTO, ...) is settled by reading one
/// byte of the file where the transfer stands: if that works, the socket
/// failed.
fn file_errno(e: &io::Error, file: &File, pos: u64) -> Option<i32> {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    match errno {
        libc::EAGAIN
        | libc::EINTR
        | libc::EPIPE
        | libc::ECONNRESET
        | libc::ECONNABORTED
        | libc::ENOTCONN
        | libc::ETIMEDOUT
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::ENETDOWN
        | libc::EHOSTDOWN => None,
        // sendfile(2): ENOMEM "insufficient memory to read from in_fd",
        // EINVAL "an mmap(2)-like operation is not available for in_fd".
        libc::EIO
        | libc::ESTALE
        | libc::EOVERFLOW
        | libc::ENXIO
        | libc::EBADMSG
        | libc::ENOMEM
        | libc::EINVAL => Some(errno),
        _ => unreadable_at(file, pos),
    }
}

/// The errno of reading one byte of `file` at `pos`, if that fails.
fn unreadable_at(file: &File, pos: u64) -> Option<i32> {
    file.read_at(&mut [0u8; 1], pos)
        .err()
        .map(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

enum Mode {
    Sendfile,
    Mmap(Option<Mapping>),
    Splice {
        pipe: Option<Pipe>,
        len: usize,
    },
    Copy {
        buf: Option<Box<[u8]>>,
        start: usize,
        end: usize,
    },
}

/// An open file being sent.
pub struct Body {
    /// Shared with the open-file cache (and other bodies) except for mmap,
    /// whose lease belongs to its own open file.
    file: Arc<File>,
    mode: Mode,
    leased: bool,
    /// Next file offset to read (to send, for sendfile/mmap).
    pos: u64,
    end: u64,
    /// Bytes of the range not yet delivered to the socket.
    left: u64,
    /// Bytes that reached the socket.
    pub sent: u64,
    pub fallback: Option<BodyFallback>,
    /// Why the lease could not be had, for the log.
    pub lease_error: Option<io::Error>,
    /// The (empty) pipe of a splice body that went on with sendfile,
    /// pooled again by `finish`.
    parked: Option<Pipe>,
}

impl Body {
    /// Prepare to send `file`. For mmap this takes the lease (before the
    /// caller's fstat, so the size it reads is protected by the lease).
    pub fn open(file: Arc<File>, p: &BodyParams, pools: &mut Pools) -> Body {
        let mut b = Body {
            file,
            mode: Mode::Sendfile,
            leased: false,
            pos: 0,
            end: 0,
            left: 0,
            sent: 0,
            fallback: None,
            lease_error: None,
            parked: None,
        };
        b.mode = match p.strategy {
            FileStrategy::Sendfile => Mode::Sendfile,
            FileStrategy::Mmap => match b.lease() {
                Ok(()) => Mode::Mmap(None),
                Err(e) => {
                    b.lease_error = Some(e);
                    b.fallback = Some(BodyFallback::NoLease);
                    Mode::Sendfile
                }
            },
            FileStrategy::Splice => match pools.pipes.get(p.pipe_size) {
                Some(pipe) => Mode::Splice {
                    pipe: Some(pipe),
                    len: 0,
                },
                None => {
                    b.fallback = Some(BodyFallback::NoPipe);
                    Mode::Sendfile
                }
            },
            FileStrategy::Copy => Mode::Copy {
                buf: Some(pools.bufs.get(p.buffer_size)),
                start: 0,
                end: 0,
            },
        };
        b
    }

    fn lease(&mut self) -> io::Result<()> {
        if !LEASE_WATCHED.with(Cell::get) {
            return Err(io::Error::other("no handler for the lease-break signal"));
        }
        let fd = self.file.as_fd();
        sys::file::set_lease_signal(fd, sys::file::lease_signal())?;
        sys::file::set_lease(fd, libc::F_RDLCK)?;
        self.leased = true;
        Ok(())
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Send bytes `[start, end)` of the file from now on. For mmap this
    /// maps those bytes; if mapping fails the body uses sendfile.
    pub fn range(&mut self, start: u64, end: u64) {
        self.pos = start;
        self.end = end;
        self.left = end.saturating_sub(start);
        if let Mode::Mmap(map) = &mut self.mode
            && end > start
        {
            // Only the pages of the range are mapped.
            match Mapping::new(self.file.as_fd(), start, end) {
                Ok(m) => *map = Some(m),
                Err(e) => {
                    self.unlease();
                    self.lease_error = Some(e);
                    self.fallback = Some(BodyFallback::NoLease);
                    self.mode = Mode::Sendfile;
                }
            }
        }
    }

    /// The strategy that really sends this body.
    pub fn strategy(&self) -> &'static str {
        match self.mode {
            Mode::Sendfile => "sendfile",
            Mode::Mmap(_) => "mmap",
            Mode::Splice { .. } => "splice",
            Mode::Copy { .. } => "copy",
        }
    }

    /// Whether this body holds a lease that the kernel is breaking. One
    /// fcntl, only for mmap bodies; asked when the break signal arrives.
    pub fn lease_broken(&self) -> bool {
        self.leased && !matches!(sys::file::get_lease(self.file.as_fd()), Ok(libc::F_RDLCK))
    }

    pub fn is_leased(&self) -> bool {
        self.leased
    }

    /// Send up to `budget` bytes to `sock`. An `Err` is the socket's; the
    /// file's own errors come back as `Sent::FileError`.
    pub fn send(&mut self, sock: &TcpStream, budget: usize) -> io::Result<(usize, Sent)> {
        let mut moved = 0usize;
        loop {
            if self.left == 0 {
                return Ok((moved, Sent::Done));
            }
            if moved >= budget {
                return Ok((moved, Sent::Budget));
            }
            let want =
                (budget - moved).min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
            // Bytes delivered to the socket, or `None`: the file ended
            // before `end`.
            let r: io::Result<Option<usize>> = match &mut self.mode {
                Mode::Sendfile => {
                    let want = want.min(1 << 30);
                    // 0 although bytes are due: the file shrank.
                    match sys::sendfile(sock.as_fd(), self.file.as_fd(), &mut self.pos, want) {
                        Ok(n) => Ok((n > 0).then_some(n)),
                        Err(e) => match file_errno(&e, &self.file, self.pos) {
                            Some(errno) => return Ok((moved, Sent::FileError(errno))),
                            None => Err(e),
                        },
                    }
                }
                Mode::Mmap(map) => match map {
                    Some(m) => match m.send_from(sock.as_fd(), self.pos, want) {
                        Ok(n) => {
                            self.pos += n as u64;
                            Ok(Some(n))
                        }
                        // The page under the mapping could not be had: the
                        // file was truncated (no lease), or reading it
                        // failed (EIO, which a page fault reports so).
                        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                            match unreadable_at(&self.file, self.pos) {
                                Some(errno) => return Ok((moved, Sent::FileError(errno))),
                                None => Ok(None),
                            }
                        }
                        Err(e) => Err(e),
                    },
                    None => Ok(None),
                },
                Mode::Splice { pipe: slot, len } => {
                    let Some(pipe) = slot.as_mut() else {
                        return Ok((moved, Sent::Shrunk));
                    };
                    if *len == 0 {
                        let room = want.min(pipe.cap);
                        match sys::splice_from_file(
                            self.file.as_fd(),
                            &mut self.pos,
                            pipe.wr(),
                            room,
                        ) {
                            Ok(0) => return Ok((moved, Sent::Shrunk)),
                            Ok(n) => *len = n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                // The pipe is empty, so the file is what
                                // would block, and no readiness event
                                // will say when it stops: send the rest
                                // with sendfile (which waits on the
                                // socket only) instead of spinning.
                                self.parked = slot.take();
                                self.fallback = Some(BodyFallback::FileBlocked);
                                self.mode = Mode::Sendfile;
                                // Back to the caller, which counts what
                                // went so far as spliced; the next turn
                                // goes on with sendfile.
                                return Ok((moved, Sent::Budget));
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                return Ok((
                                    moved,
                                    Sent::FileError(e.raw_os_error().unwrap_or(libc::EIO)),
                                ));
                            }
                        }
                    }
                    sys::splice(pipe.rd(), sock.as_fd(), *len, false).map(|n| {
                        *len -= n;
                        Some(n)
                    })
                }
                Mode::Copy { buf, start, end } => {
                    let Some(buf) = buf else {
                        return Ok((moved, Sent::Shrunk));
                    };
                    if *start == *end {
                        let room = want.min(buf.len());
                        match self.file.read_at(&mut buf[..room], self.pos) {
                            Ok(0) => return Ok((moved, Sent::Shrunk)),
                            Ok(n) => {
                                self.pos += n as u64;
                                *start = 0;
                                *end = n;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                return Ok((
                                    moved,
                                    Sent::FileError(e.raw_os_error().unwrap_or(libc::EIO)),
                                ));
                            }
                        }
                    }
                    let mut s: &TcpStream = sock;
                    s.write(&buf[*start..*end]).map(|n| {
                        *start += n;
                        Some(n)
                    })
                }
            };
            match r {
                Ok(None) => return Ok((moved, Sent::Shrunk)),
                Ok(Some(n)) => {
                    moved += n;
                    self.sent += n as u64;
                    self.left -= n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((moved, Sent::Blocked));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn unlease(&mut self) {
        if self.leased {
            let _ = sys::file::set_lease(self.file.as_fd(), libc::F_UNLCK);
            self.leased = false;
        }
    }

    /// End the transfer: unmap first, then release the lease, give pooled
    /// holders back (a pipe that still holds bytes is closed, not pooled),
    /// and let go of the file (closed unless the open-file cache keeps it).
    pub fn finish(mut self, pools: &mut Pools) {
        match std::mem::replace(&mut self.mode, Mode::Sendfile) {
            Mode::Mmap(map) => drop(map),
            Mode::Splice { pipe: Some(p), len } => pools.pipes.put(p, len == 0),
            Mode::Copy { buf: Some(b), .. } => pools.bufs.put(b),
            _ => {}
        }
        if let Some(p) = self.parked.take() {
            pools.pipes.put(p, true);
        }
        self.unlease();
    }
}
