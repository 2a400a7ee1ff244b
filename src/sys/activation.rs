//! systemd socket activation: take the listening sockets systemd passed
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`) and own them safely.
//!
//! systemd hands the sockets over as bare descriptor numbers starting at
//! 3. Turning a number into an `OwnedFd` is only sound if nothing else in
//! the process owns it, so adoption happens at most once per process
//! (guarded by a flag) and only for the numbers the protocol names; each
//! descriptor is then checked to really be a listening stream socket
//! before the server uses it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Socket, Type};

/// A socket systemd passed, with the name its unit gave it.
pub struct Activated {
    /// `FileDescriptorName=` (systemd's default is the socket unit's name).
    pub name: String,
    /// The descriptor number systemd used, for the log.
    pub fd: i32,
    pub addr: SocketAddr,
    pub sock: std::net::TcpListener,
}

/// A passed descriptor that is not a usable TCP listener: it is closed.
pub struct Rejected {
    pub name: String,
    pub fd: i32,
    pub why: String,
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Take the sockets systemd passed to this process (none when the
/// `LISTEN_*` variables are absent or name another process). Only the
/// first call takes anything; later calls return nothing. The server
/// calls it first thing at start, before it opens any descriptor of its
/// own, so the numbers systemd names cannot belong to anything else.
pub fn take_listen_fds() -> io::Result<(Vec<Activated>, Vec<Rejected>)> {
    // Variables meant for another process (say, inherited from a parent
    // that was socket-activated) are not ours: ignore them quietly. The
    // crate checks LISTEN_PID too, but then still compares LISTEN_FDNAMES
    // with the empty list and reports an error.
    let pid = std::env::var("LISTEN_PID").ok();
    if pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok((Vec::new(), Vec::new()));
    }
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names()?.collect();
    if fds.is_empty() || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (fd, name) in fds {
        // SAFETY: by the socket activation protocol, descriptors 3 up to
        // 3 + LISTEN_FDS are open and handed to this process (LISTEN_PID
        // was checked, and each fd proved open by F_GETFD, in
        // `listen_fds_with_names`). They were inherited, so nothing in
        // sluice opened them, nothing else uses them by number, and the
        // TAKEN flag makes sure they are wrapped once only: the OwnedFd is
        // their sole owner.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match check(Socket::from(owned)) {
            Ok((addr, sock)) => ok.push(Activated {
                name,
                fd,
                addr,
                sock,
            }),
            Err(e) => bad.push(Rejected {
                name,
                fd,
                why: e.to_string(),
            }),
        }
    }
    Ok((ok, bad))
}

/// A passed socket must be a listening TCP socket; make it non-blocking.
fn check(sock: Socket) -> io::Result<(SocketAddr, std::net::TcpListener)> {
    let kind = sock.r#type().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => io::Error::other("not a socket"),
        _ => e,
    })?;
    if kind != Type::STREAM {
        return Err(io::Error::other("not a stream socket"));
    }
    if !sock.is_listener()? {
        return Err(io::Error::other("not a listening socket"));
    }
    let addr = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IPv4 or IPv6 socket"))?;
    sock.set_nonblocking(true)?;
    sock.set_cloexec(true)?;
    Ok((addr, sock.into()))
}
