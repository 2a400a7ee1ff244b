//! Moving bytes in one direction of a proxied connection.
//!
//! A `Flow` is one direction (client → backend or backend → client). It
//! owns whatever holds the bytes in flight — a pipe (`splice`) or a buffer
//! (`copy`) — and drives it with the edge-triggered readiness the
//! connection remembers for each socket: read while the source is ready
//! and there is room, write while the destination is ready and bytes are
//! held, and stop only when neither can make progress. The flow returns to
//! the event loop with the readiness flags telling which event will resume
//! it, so a stopped direction never spins.
//!
//! Bytes live in at most one holder at a time; a flow only switches between
//! splice and copy when the holder is empty, so order is always kept. The
//! holder goes back to its pool the moment it is empty (an empty pipe the
//! worker's pool would close instead stays with its flow until the next
//! byte: see `fill`).
//!
//! The strategies themselves (`splice`, `copy`) each implement the small
//! `Pump` interface; file routes have their own in `file`.

pub mod copy;
pub mod file;
pub mod splice;

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;

use mio::net::TcpStream;

use crate::config::ProxyStrategy;
use crate::pipe_pool::{BufPool, PipePool};
use copy::CopyPump;
use splice::SplicePump;

/// What every socket-to-socket strategy offers the flow.
pub trait Pump {
    /// Bytes read from the source and not yet written out.
    fn pending(&self) -> usize;
    /// How many more bytes the holder can take.
    fn room(&self) -> usize;
    /// Read from `src` into the holder; Ok(0) is end of stream.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize>;
    /// Write held bytes to `dst`. `last`: they are the stream's final
    /// bytes and its FIN follows at once, so a partial segment may wait
    /// for it (MSG_MORE / SPLICE_F_MORE) and both leave as one packet.
    fn flush(&mut self, dst: &TcpStream, last: bool) -> io::Result<usize>;
}

/// Bytes one flow delivers per event-loop turn before it yields to the
/// worker's other connections (like nginx's `sendfile_max_chunk`).
pub const TURN_BUDGET: u64 = 2 << 20;

/// How bytes moved, for the access log: by splice, copy, both or neither.
pub fn strategy_name(spliced: u64, copied: u64) -> &'static str {
    match (spliced > 0, copied > 0) {
        (true, true) => "splice+copy",
        (true, false) => "splice",
        (false, true) => "copy",
        (false, false) => "none",
    }
}

/// Per-route settings a flow needs.
#[derive(Debug, Clone, Copy)]
pub struct FlowParams {
    pub strategy: ProxyStrategy,
    pub pipe_size: usize,
    pub buffer_size: usize,
}

/// The worker's pools a flow borrows holders from.
pub struct Pools<'a> {
    pub pipes: &'a mut PipePool,
    pub bufs: &'a mut BufPool,
}

/// Why a flow that wanted to splice moved bytes by copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The pipe pool was empty (budget spent or the kernel refused a pipe).
    NoPipe,
    /// splice(2) returned EINVAL/ENOSYS for this socket.
    Refused,
    /// splice(2) from the socket said ENOMEM: the kernel was short of
    /// memory for a moment. That chunk is copied; the next one splices.
    Memory,
}

impl Fallback {
    /// Why a connection's two flows copied: each direction's reason, once
    /// (two different reasons both count, the same one once).
    pub fn both(up: Option<Fallback>, down: Option<Fallback>) -> Vec<Fallback> {
        match (up, down) {
            (Some(u), Some(d)) if u != d => vec![u, d],
            (u, d) => u.or(d).into_iter().collect(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NoPipe => "no_pipe",
            Fallback::Refused => "splice_refused",
            Fallback::Memory => "memory",
        }
    }
}

/// The error that ended a flow, and on which side it happened.
#[derive(Debug)]
pub enum FlowError {
    Read(io::Error),
    Write(io::Error),
}

/// One side's readiness as the connection remembers it between events.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ready {
    pub read: bool,
    pub write: bool,
    /// The peer has shut its write side (EPOLLRDHUP seen): a short read no
    /// longer proves the socket is drained, read on until 0.
    pub hup: bool,
}

impl Ready {
    /// Fold an event into the remembered readiness. An error or hang-up
    /// makes both directions "ready": the next syscall says what happened.
    pub fn update(&mut self, ev: &mio::event::Event) {
        let err = ev.is_error();
        self.read |= ev.is_readable() || ev.is_read_closed() || err;
        self.write |= ev.is_writable() || ev.is_write_closed() || err;
        self.hup |= ev.is_read_closed();
    }
}

enum Held {
    Idle,
    Splice(SplicePump),
    Copy(CopyPump),
}

/// One direction of a relay.
pub struct Flow {
    held: Held,
    params: FlowParams,
    /// End of stream read from the source.
    pub eof: bool,
    /// End of stream forwarded to the destination: by shutdown(SHUT_WR),
    /// or by the close(2) that follows at once (`fin_by_close`).
    pub shut: bool,
    /// splice was refused for this socket pair: copy from now on.
    splice_refused: bool,
    /// splice(2) into an empty pipe said ENOMEM: the next holder is a
    /// copy buffer, and splicing resumes once it is given back.
    copy_once: bool,
    /// `auto`: a read filled a whole buffer, so this is a bulk transfer.
    bulk: bool,
    /// splice said EAGAIN while the pipe held bytes: maybe the pipe is
    /// full, maybe the socket is empty. Retry reading after a flush.
    pipe_maybe_full: bool,
    pub spliced: u64,
    pub copied: u64,
    /// Bytes read from the source (for `sys::ended_by_reset`).
    read: u64,
    /// The opposite direction holds bytes it could not write to this
    /// flow's source, or stopped writing to it: a reset may have ended
    /// the source with no error left to say so (see `fill`). Set by the
    /// connection before each `run` (see `closes_after`).
    reset_may_hide: bool,
    /// First reason this flow had to copy although it wanted to splice.
    pub fallback: Option<Fallback>,
    /// The destination stopped taking bytes (EPIPE/reset): what the source
    /// still sends is read and dropped, so the source's peer never sees a
    /// reset for unread data while the other direction finishes.
    discarding: bool,
    /// The source was reset: finish without forwarding a FIN.
    no_fin: bool,
    /// The source was reset but what it sent before is still to be read:
    /// the end-of-stream a read meets then is that reset, not a FIN (and
    /// becomes `no_fin`).
    eof_is_reset: bool,
    /// The other direction is over, so the connection closes as soon as
    /// this one ends and close(2) sends the FIN: no shutdown(2) needed.
    /// Set by the connection before each `run` (see `closes_after`).
    fin_by_close: bool,
    /// The last `run` stopped at its byte budget with work left: run again
    /// on the next loop turn (no edge will come for a still-ready socket).
    pub more: bool,
    /// Leading held bytes that are sluice's own (a PROXY header), not the
    /// source's: delivered first, but not counted as relayed.
    uncounted: usize,
}

impl Flow {
    pub fn new(params: FlowParams) -> Self {
        Flow {
            held: Held::Idle,
            params,
            eof: false,
            shut: false,
            splice_refused: false,
            copy_once: false,
            bulk: false,
            pipe_maybe_full: false,
            spliced: 0,
            copied: 0,
            read: 0,
            reset_may_hide: false,
            fallback: None,
            discarding: false,
            no_fin: false,
            eof_is_reset: false,
            fin_by_close: false,
            more: false,
            uncounted: 0,
        }
    }

    /// The source's first `n` bytes were read before this flow began (a
    /// PROXY header and what came with it): count them as read.
    pub fn after_reading(mut self, n: usize) -> Self {
        self.read = n as u64;
        self
    }

    /// Put `bytes` in front of everything this flow will still move, so
    /// they are the first the destination receives: a PROXY header, or
    /// client bytes read before the relay began. They sit in a copy
    /// buffer that `run` flushes like any other; once it is empty the
    /// flow goes on with its strategy. `counted`: whether they count as
    /// relayed bytes (client bytes do, sluice's own header does not).
    /// Call before the flow has read anything from its source, and with
    /// uncounted bytes before counted ones.
    pub fn preload(&mut self, bytes: &[u8], counted: bool, pools: &mut Pools) {
        if bytes.is_empty() {
            return;
        }
        debug_assert!(counted || self.pending() == self.uncounted);
        if let Held::Splice(p) = &self.held
            && p.len == 0
        {
            self.release(pools);
        }
        let pending = self.pending();
        let need = pending + bytes.len();
        let fits = matches!(&self.held, Held::Copy(p) if p.buf.len() >= need);
        if !fits {
            debug_assert!(matches!(self.held, Held::Idle | Held::Copy(_)));
            // A buffer of the route's size when the bytes fit one (so it
            // goes back to the pool), else one just big enough.
            let size = self.params.buffer_size.max(need);
            let mut c = CopyPump::new(pools.bufs.get(size));
            if let Held::Copy(old) = std::mem::replace(&mut self.held, Held::Idle) {
                c.buf[..pending].copy_from_slice(&old.buf[old.start..old.end]);
                c.end = pending;
                self.put_buf(old.buf, pools);
            }
            self.held = Held::Copy(c);
        }
        if let Held::Copy(c) = &mut self.held {
            if c.buf.len() - c.end < bytes.len() {
                // Room at the front only: move the pending bytes down.
                c.buf.copy_within(c.start..c.end, 0);
                c.end -= c.start;
                c.start = 0;
            }
            c.buf[c.end..c.end + bytes.len()].copy_from_slice(bytes);
            c.end += bytes.len();
        }
        if !counted {
            self.uncounted += bytes.len();
        }
    }

    /// Bytes read but not yet delivered.
    pub fn pending(&self) -> usize {
        match &self.held {
            Held::Idle => 0,
            Held::Splice(p) => p.pending(),
            Held::Copy(p) => p.pending(),
        }
    }

    /// Whether this direction has finished: its end of stream reached the
    /// other side after every byte.
    pub fn done(&self) -> bool {
        self.shut
    }

    /// Tell this flow what `other`, the opposite direction, means for it.
    /// Whether `other` is over, finished after reading its source to the
    /// end: then this flow's destination has nothing unread (its peer sent
    /// a FIN and sluice read up to it), the connection closes the moment
    /// this flow ends, and close(2) sends the FIN after the queued bytes,
    /// as shutdown(2) would: one syscall less per connection. And whether
    /// `other` is stuck writing to this flow's source (`reset_may_hide`).
    pub fn closes_after(&mut self, other: &Flow) {
        self.fin_by_close = other.shut && other.eof && !other.discarding;
        self.reset_may_hide = other.pending() > 0 || other.discarding;
    }

    /// Move bytes from `src` to `dst` until neither side can make
    /// progress, or until `TURN_BUDGET` bytes moved (then `more` is set and
    /// the connection asks for another turn, so one bulk stream cannot
    /// hold its worker). Returns the bytes delivered during this call.
    pub fn run(
        &mut self,
        src: &TcpStream,
        sr: &mut Ready,
        dst: &TcpStream,
        dr: &mut Ready,
        pools: &mut Pools,
    ) -> Result<u64, FlowError> {
        self.more = false;
        if self.discarding {
            self.discard(src, sr).map_err(FlowError::Read)?;
            return Ok(0);
        }
        let mut delivered = 0u64;
        loop {
            let mut progress = false;
            if delivered >= TURN_BUDGET {
                self.more = true;
                break;
            }

            // The source's FIN has arrived, so all it will ever send is
            // already queued here: read up to the FIN before writing, and
            // the last write knows it is the last.
            let to_fin = sr.hup && sr.read && !self.eof && !self.pipe_maybe_full;
            let can_write = self.pending() > 0 && dr.write;
            let deferred = can_write && to_fin && self.held_room() > 0;
            if can_write && !deferred {
                let want = self.pending();
                // No FIN follows a reset: then no flush is the last.
                let last = self.eof && !self.no_fin;
                let res = match &mut self.held {
                    Held::Splice(p) => p.flush(dst, last),
                    Held::Copy(p) => p.flush(dst, last),
                    Held::Idle => Ok(0),
                };
                match res {
                    Ok(n) => {
                        progress = n > 0;
                        let own = n.min(self.uncounted);
                        self.uncounted -= own;
                        let relayed = (n - own) as u64;
                        delivered += relayed;
                        match self.held {
                            Held::Splice(_) => self.spliced += relayed,
                            _ => self.copied += relayed,
                        }
                        self.pipe_maybe_full = false;
                        if n < want {
                            // A short write means the socket buffer is full;
                            // EPOLLOUT will fire when it drains.
                            dr.write = false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dr.write = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(FlowError::Write(e)),
                }
                if self.pending() == 0 {
                    self.release(pools);
                }
            }

            if !self.eof && sr.read && !self.pipe_maybe_full && self.room(pools) > 0 {
                match self.fill(src, sr, pools) {
                    Ok(p) => progress |= p,
                    Err(e) => return Err(FlowError::Read(e)),
                }
            }

            // A write put off for the FIN must not be left behind when the
            // read stops short of it (a pipe can run out of slots before
            // bytes: then `fill` sets `pipe_maybe_full`): `to_fin` is false
            // on the next pass, which writes.
            if !progress && !deferred {
                break;
            }
        }
        // Stopping with bytes held for a writable destination would wait
        // for an edge that never comes.
        debug_assert!(
            self.more || self.pending() == 0 || !dr.write,
            "flow stopped holding {} bytes for a writable destination",
            self.pending()
        );
        if self.eof && self.pending() == 0 && !self.shut {
            self.release(pools);
            // The peer may already be gone (ENOTCONN); the flow is over
            // either way, and a real write error shows on the other flow.
            if !self.no_fin && !self.fin_by_close {
                let _ = dst.shutdown(Shutdown::Write);
            }
            self.shut = true;
        }
        Ok(delivered)
    }

    /// The destination is gone: drop what is held (a pipe with bytes is
    /// closed, never pooled), count the direction as finished, and from now
    /// on read and drop what the source sends.
    pub fn abort(&mut self, pools: &mut Pools) {
        self.release(pools);
        self.discarding = true;
        self.shut = true;
    }

    /// The source was reset: deliver what is held, but send no FIN after
    /// it (the connection will pass the reset on instead).
    pub fn source_reset(&mut self) {
        self.eof = true;
        self.no_fin = true;
    }

    /// The source's socket was found reset by a write to it, with what it
    /// sent before still queued: read that, then end without a FIN (the
    /// end-of-stream the reads meet is the reset). No effect once the
    /// source's end was read: a FIN came first, so its stream is whole.
    pub fn source_reset_pending(&mut self) {
        self.eof_is_reset = !self.eof;
    }

    /// The source's end was a reset (`source_reset`, or one a write met).
    pub fn ended_by_reset(&self) -> bool {
        self.eof && self.no_fin
    }

    /// Whether the flow is dropping its source's bytes (see `abort`).
    pub fn discarding(&self) -> bool {
        self.discarding
    }

    /// Read and drop until the source would block or ends, or until
    /// `TURN_BUDGET` bytes went (then `more`, as in `run`). A read error is
    /// the source's own end: a reset, not a FIN.
    fn discard(&mut self, mut src: &TcpStream, sr: &mut Ready) -> io::Result<()> {
        let mut sink = [0u8; 16 * 1024];
        let mut dropped = 0u64;
        while sr.read && !self.eof {
            if dropped >= TURN_BUDGET {
                self.more = true;
                break;
            }
            match io::Read::read(&mut src, &mut sink) {
                Ok(0) => self.eof = true,
                Ok(n) => dropped += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => sr.read = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.eof = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Room in the holder there is now (0 without one); unlike `room`,
    /// never takes a holder from the pools.
    fn held_room(&self) -> usize {
        match &self.held {
            Held::Idle => 0,
            Held::Splice(p) => p.room(),
            Held::Copy(p) => p.room(),
        }
    }

    /// Room in the current holder, taking a holder from the pools when the
    /// flow holds nothing.
    fn room(&mut self, pools: &mut Pools) -> usize {
        if let Held::Idle = self.held {
            self.held = self.choose(pools);
        }
        self.held_room()
    }

    fn choose(&mut self, pools: &mut Pools) -> Held {
        let wants_splice = match self.params.strategy {
            ProxyStrategy::Splice => true,
            ProxyStrategy::Auto => self.bulk,
            ProxyStrategy::Copy => false,
        };
        if wants_splice {
            if self.splice_refused {
                self.fallback.get_or_insert(Fallback::Refused);
            } else if std::mem::take(&mut self.copy_once) {
                self.fallback.get_or_insert(Fallback::Memory);
            } else if let Some(pipe) = pools.pipes.get(self.params.pipe_size) {
                return Held::Splice(SplicePump { pipe, len: 0 });
            } else {
                self.fallback.get_or_insert(Fallback::NoPipe);
            }
        }
        Held::Copy(CopyPump::new(pools.bufs.get(self.params.buffer_size)))
    }

    /// Read once into the holder; returns whether anything changed.
    fn fill(&mut self, src: &TcpStream, sr: &mut Ready, pools: &mut Pools) -> io::Result<bool> {
        let (res, spliced_before, room) = match &mut self.held {
            Held::Splice(p) => (p.fill(src), p.len, p.room()),
            Held::Copy(p) => {
                let room = p.room();
                (p.fill(src), 0, room)
            }
            Held::Idle => return Ok(false),
        };
        let is_splice = matches!(self.held, Held::Splice(_));
        match res {
            Ok(0) => {
                self.eof = true;
                sr.read = false;
                // A reset can end the stream with no error left to report:
                // a splice(2) of the other direction into this socket may
                // take it in one of its sends and still return the bytes it
                // moved; the next write says EPIPE and this read says 0, as
                // for a FIN. Such a splice leaves bytes behind (or the
                // write after it failed): only then ask the kernel which
                // end it was, one getsockopt.
                if self.eof_is_reset
                    || (self.reset_may_hide
                        && crate::sys::ended_by_reset(src.as_fd(), self.read).unwrap_or(false))
                {
                    self.no_fin = true;
                }
                Ok(true)
            }
            Ok(n) => {
                self.read += n as u64;
                if !is_splice {
                    if n == room && self.pending() == n {
                        self.bulk = true;
                    } else if n < room && !sr.hup {
                        // A short read drained the socket; the next byte to
                        // arrive raises a new edge.
                        sr.read = false;
                    }
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if is_splice && spliced_before > 0 {
                    self.pipe_maybe_full = true;
                } else {
                    sr.read = false;
                    // The source is drained: an empty holder goes back
                    // now, or an idle connection would keep a pipe (or a
                    // buffer) until its next byte, out of the pool's reach
                    // and counted against `max_pipes`. Not a pipe the
                    // pool would close (its idle share is full, or none
                    // with fewer pipes than workers): a transfer whose
                    // socket drains often would make a pipe each time.
                    if self.pending() == 0 && (!is_splice || pools.pipes.would_pool()) {
                        self.release(pools);
                    }
                }
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e)
                if is_splice
                    && spliced_before == 0
                    && matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) =>
            {
                // This socket cannot be spliced: copy from now on.
                self.splice_refused = true;
                self.release(pools);
                Ok(true)
            }
            Err(e) if is_splice && e.raw_os_error() == Some(libc::ENOMEM) => {
                // The kernel could not get memory for this splice just now
                // (pipe buffers, socket pages): nothing was lost, the bytes
                // are still in the socket. An empty pipe goes back, and
                // this chunk is copied through a buffer; bytes held are
                // written out first, then the read is tried again.
                if spliced_before == 0 {
                    self.copy_once = true;
                    self.release(pools);
                    Ok(true)
                } else {
                    self.pipe_maybe_full = true;
                    Ok(false)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Return an empty holder to its pool.
    fn release(&mut self, pools: &mut Pools) {
        match std::mem::replace(&mut self.held, Held::Idle) {
            Held::Idle => {}
            Held::Splice(p) => pools.pipes.put(p.pipe, p.len == 0),
            Held::Copy(p) => self.put_buf(p.buf, pools),
        }
    }

    /// Pool a buffer of the route's size; drop an odd-sized one (made by
    /// `preload`) so the pool never fills with sizes nobody asks for.
    fn put_buf(&self, buf: Box<[u8]>, pools: &mut Pools) {
        if buf.len() == self.params.buffer_size {
            pools.bufs.put(buf);
        }
    }

    /// Give back whatever the flow holds when the connection ends. A pipe
    /// that still holds bytes is closed, never pooled.
    pub fn finish(&mut self, pools: &mut Pools) {
        self.release(pools);
    }

    /// The strategy that actually moved this flow's bytes.
    pub fn strategy_used(&self) -> &'static str {
        strategy_name(self.spliced, self.copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyStrategy;
    use crate::pipe_pool::{BufPool, PipeBudget, PipePool};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};

    /// A connected loopback pair: a blocking std end and a non-blocking
    /// mio end, as a worker holds it.
    fn pair() -> (std::net::TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, TcpStream::from_std(b))
    }

    /// A connection whose flows both copied counts each reason once.
    #[test]
    fn a_connection_counts_each_reason_its_flows_copied_for_once() {
        use Fallback::*;
        assert_eq!(Fallback::both(None, None), vec![]);
        assert_eq!(Fallback::both(Some(NoPipe), None), vec![NoPipe]);
        assert_eq!(Fallback::both(None, Some(Memory)), vec![Memory]);
        assert_eq!(Fallback::both(Some(NoPipe), Some(NoPipe)), vec![NoPipe]);
        assert_eq!(
            Fallback::both(Some(NoPipe), Some(Memory)),
            vec![NoPipe, Memory]
        );
    }

    /// The source's FIN is queued behind small segments (each its own
    /// fragment: a byte to another socket between writes keeps them apart
    /// in memory), and the pipe has one slot, so a read ahead to the FIN
    /// stops on the pipe after one segment. One `run` must still deliver
    /// everything and the FIN: no event would come to resume it.
    #[test]
    fn reading_ahead_to_a_fin_never_strands_held_bytes() {
        let (mut peer, src) = pair();
        let (mut spoil, _spoil_end) = pair();
        peer.set_nodelay(true).unwrap();
        let mut sent = Vec::new();
        for i in 0..20u8 {
            let seg = [i; 1000];
            peer.write_all(&seg).unwrap();
            spoil.write_all(b".").unwrap();
            sent.extend_from_slice(&seg);
        }
        peer.shutdown(Shutdown::Write).unwrap();
        // Wait until all of it and the FIN are queued on `src`.
        let mut probe = vec![0u8; 64 * 1024];
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while src.peek(&mut probe).unwrap_or(0) < sent.len() {
            assert!(std::time::Instant::now() < give_up, "segments never queued");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (mut client, dst) = pair();

        let mut pipes = PipePool::new(PipeBudget::new(4, 1));
        let mut bufs = BufPool::default();
        let mut pools = Pools {
            pipes: &mut pipes,
            bufs: &mut bufs,
        };
        let mut flow = Flow::new(FlowParams {
            strategy: ProxyStrategy::Splice,
            pipe_size: 4096,
            buffer_size: 4096,
        });
        let mut sr = Ready {
            read: true,
            write: true,
            hup: true,
        };
        let mut dr = Ready {
            read: false,
            write: true,
            hup: false,
        };
        let n = flow.run(&src, &mut sr, &dst, &mut dr, &mut pools).unwrap();
        assert_eq!(n, sent.len() as u64, "pending {}", flow.pending());
        assert!(flow.done() && flow.eof);
        assert_eq!(flow.spliced, sent.len() as u64);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert!(
            got == sent,
            "{} bytes, not the {} sent",
            got.len(),
            sent.len()
        );
    }
}
