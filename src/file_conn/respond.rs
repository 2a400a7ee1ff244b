//! Answering one parsed HTTP request: map the target to a file (with
//! the path rules of `http::path` and openat2 beneath the route's root,
//! or from the worker's validated open-file cache, `open_files`),
//! decide the status (304, 206, 416, 301, 404...) with `http::cond`, and
//! queue the response head and body on the session. No I/O on the socket
//! happens here; `FileConn::drive` sends what this queues.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::open_files::{self, OpenFiles, Opened};
use super::{FileConn, Resp, leased_stat, open_file, pools};
use crate::config::{FileRoute, FileSource, FileStrategy};
use crate::conn::Ctx;
use crate::http::cond::{self, Span, Validators};
use crate::http::path;
use crate::http::request::{Method, Request};
use crate::http::response::{self, Head};
use crate::pump::file::Body;
use crate::sys;
use crate::sys::file::FileStat;

impl FileConn {
    /// Answer one parsed request: queue its response.
    pub(super) fn respond(&mut self, req: Request, ctx: &mut Ctx) {
        let head_only = req.method == Method::Head;
        let (minor, keep) = (req.minor, req.keep_alive && !self.draining);
        if req.method == Method::Other {
            self.error(minor, 405, keep, Some(&req), ctx);
            return;
        }
        let route = self.route.clone();
        let f = route.file().expect("file route");
        let opened = match self.open_target(f, &req.target, ctx) {
            Ok(v) => v,
            Err(301) => {
                // A folder named without its trailing slash: send the
                // client to the slash form, so relative links in the index
                // resolve inside the folder. The location is rebuilt from
                // the checked path, never copied from the request; only
                // the query is kept, re-encoded.
                let loc = path::resolve(&req.target, f.dotfiles)
                    .map(|rel| path::dir_location(&rel))
                    .unwrap_or_else(|_| "/".into());
                let loc = path::with_query(loc, &req.target);
                let head = response::redirect(minor, &loc, keep, head_only);
                self.resp = Some(resp(head, None, keep, 301, ctx.now).named(&req));
                return;
            }
            Err(status) => {
                let keep = keep && status < 500;
                let mut r = resp_error(minor, status, keep, head_only, ctx.now);
                r.method = req.method_name;
                r.target = req.target;
                self.resp = Some(r);
                return;
            }
        };
        let Opened {
            file, stat, ctype, ..
        } = opened;
        let mut v = Validators::new(stat.size, stat.modified());
        if self.conditional(&v, &req, keep, ctx.now) {
            return;
        }
        let mut size = stat.size;
        let mut body = None;
        if !head_only {
            let now = ctx.now;
            let mut pools = pools(ctx);
            let b = Body::open(file, &self.params, &mut pools);
            // With a lease the file cannot change any more: read its size
            // and mtime again, so the preconditions, length, range and
            // validators sent all describe the very bytes the mapping
            // holds (a write between the stat above and the lease changed
            // them).
            if let Some(st) = leased_stat(&b)
                && (st.size, st.modified()) != (size, stat.modified())
            {
                size = st.size;
                v = Validators::new(st.size, st.modified());
                if self.conditional(&v, &req, keep, now) {
                    b.finish(&mut pools);
                    return;
                }
            }
            body = Some(b);
        }
        let span = cond::span(req.range.as_deref(), req.if_range.as_deref(), &v, size);
        let (status, start, end) = match span {
            Span::Full => (200, 0, size),
            Span::Part(a, b) => (206, a, b),
            Span::Unsatisfiable => {
                if let Some(b) = body.take() {
                    b.finish(&mut pools(ctx));
                }
                let head = Head::new(minor, 416)
                    .header("Content-Range", format!("bytes */{size}"))
                    .header("Content-Length", 0)
                    .finish(minor, keep);
                self.resp = Some(resp(head, None, keep, 416, ctx.now).named(&req));
                return;
            }
        };
        let mut h = Head::new(minor, status)
            .header("Content-Type", &*ctype)
            .header("Content-Length", end - start)
            .header("Last-Modified", v.last_modified())
            .header("ETag", &v.etag)
            .header("Accept-Ranges", "bytes");
        if status == 206 {
            h = h.header(
                "Content-Range",
                format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
            );
        }
        let head = h.finish(minor, keep);
        if let Some(b) = body.as_mut() {
            b.range(start, end);
            self.note_fallback(b, ctx);
        }
        if end == start
            && let Some(b) = body.take()
        {
            b.finish(&mut pools(ctx));
        }
        self.resp = Some(resp(head, body, keep, status, ctx.now).named(&req));
    }

    /// Queue the answer the conditional headers call for with these
    /// validators, if any (412 for If-Match/If-Unmodified-Since, 304 for
    /// If-None-Match/If-Modified-Since); whether one was queued.
    fn conditional(&mut self, v: &Validators, req: &Request, keep: bool, now: Instant) -> bool {
        let minor = req.minor;
        let status = if cond::precondition_failed(
            v,
            req.if_match.as_deref(),
            req.if_unmodified_since.as_deref(),
        ) {
            412
        } else if cond::not_modified(
            v,
            req.if_none_match.as_deref(),
            req.if_modified_since.as_deref(),
        ) {
            304
        } else {
            return false;
        };
        let mut h = Head::new(minor, status)
            .header("ETag", &v.etag)
            .header("Last-Modified", v.last_modified());
        if status == 412 {
            h = h.header("Content-Length", 0);
        }
        let head = h.finish(minor, keep);
        self.resp = Some(resp(head, None, keep, status, now).named(req));
        true
    }

    /// Open the file a target names, or take it from the worker's
    /// open-file cache. `Err(status)` when it cannot be served (301: a
    /// folder named without its trailing slash).
    fn open_target(&self, f: &FileRoute, target: &str, ctx: &mut Ctx) -> Result<Opened, u16> {
        // mmap bodies lease their own open file: never shared.
        let cacheable = f.strategy != FileStrategy::Mmap && ctx.files.enabled();
        let (root, rel) = match &f.source {
            FileSource::File(p) => (None, p.clone()),
            FileSource::Root(dir) => {
                let root = ctx.files.roots.get(&self.route, dir, ctx.now);
                (
                    Some(root.ok_or(500u16)?),
                    path::resolve(target, f.dotfiles)?,
                )
            }
        };
        let dir = root.as_deref().map(|r| r.as_fd());
        let slash = || {
            target
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .ends_with('/')
        };
        // A file named as a folder (`/a.txt/`) is not there, as the kernel
        // would say (ENOTDIR); only a root's folders end in a slash.
        let file_as_folder = |index: bool| dir.is_some() && !index && slash();
        let rel = if cacheable {
            match ctx.files.get(self.route.id, dir, rel, ctx.now) {
                Ok(o) if o.index && !slash() => return Err(301),
                Ok(o) if file_as_folder(o.index) => return Err(404),
                Ok(o) => return Ok(o),
                Err(rel) => rel,
            }
        } else {
            rel
        };
        let (mut file, mut st) = open_at(dir, &rel, ctx.files, ctx.pools.pipes)?;
        let mut index = None;
        if st.is_dir() && dir.is_some() {
            // No listings: the index file, or nothing.
            let name = f.index.as_ref().ok_or(404u16)?;
            if !slash() {
                return Err(301);
            }
            let path = rel.join(name);
            (file, st) = open_at(dir, &path, ctx.files, ctx.pools.pipes)?;
            index = Some(path);
        }
        if !st.is_file() || file_as_folder(index.is_some()) {
            return Err(404); // a FIFO, device or socket is never served
        }
        let opened = Opened {
            file: Arc::new(file),
            stat: st,
            ctype: response::content_type(index.as_deref().unwrap_or(&rel)).into(),
            index: index.is_some(),
        };
        if cacheable && st.size <= open_files::MAX_CACHED_SIZE {
            ctx.files.put(self.route.id, rel, index, &opened, ctx.now);
        }
        Ok(opened)
    }

    /// Queue an error response. Malformed, over-long or timed-out
    /// requests leave the stream out of step: the caller passes `keep`
    /// false for them, so the connection closes after the answer.
    pub(super) fn error(
        &mut self,
        minor: u8,
        status: u16,
        keep: bool,
        req: Option<&Request>,
        ctx: &Ctx,
    ) {
        let r = resp_error(minor, status, keep, false, ctx.now);
        self.resp = Some(match req {
            Some(req) => r.named(req),
            None => r,
        });
    }
}

/// A queued response.
pub(super) fn resp(
    head: Vec<u8>,
    body: Option<Body>,
    keep_alive: bool,
    status: u16,
    now: Instant,
) -> Resp {
    Resp {
        head,
        head_sent: 0,
        body,
        keep_alive,
        method: "-".into(),
        target: "-".into(),
        status,
        started: now,
    }
}

pub(super) fn resp_error(
    minor: u8,
    status: u16,
    keep: bool,
    head_only: bool,
    now: Instant,
) -> Resp {
    resp(
        response::error(minor, status, keep, head_only),
        None,
        keep,
        status,
        now,
    )
}

impl Resp {
    fn named(mut self, req: &Request) -> Resp {
        self.method = req.method_name.clone();
        self.target = req.target.clone();
        self
    }
}

/// How many times an open beneath a root is tried while a rename
/// somewhere on the machine makes openat2 answer EAGAIN.
const OPEN_TRIES: u32 = 8;

/// Open `rel` beneath `dir` (confined by openat2), or the absolute `rel`
/// with `None`, and fstat it. Out of descriptors, the open-file cache and
/// the idle pipes give back half of their own and the open is tried once
/// more. openat2 fails with EAGAIN when a rename or mount anywhere races
/// with a walk through `..` (a symlink such as `../a.txt` inside the
/// root); as its manual says, the open is tried again.
fn open_at(
    dir: Option<BorrowedFd>,
    rel: &Path,
    files: &mut OpenFiles,
    pipes: &mut crate::pipe_pool::PipePool,
) -> Result<(File, FileStat), u16> {
    let mut shed = false;
    let mut tries = 1;
    loop {
        let res = match dir {
            Some(root) => sys::file::open_beneath(root, rel).map(File::from),
            None => open_file(rel),
        };
        match res {
            Ok(file) => {
                let st = sys::file::fstat(file.as_fd()).map_err(|e| status_of(&e))?;
                return Ok((file, st));
            }
            Err(e)
                if !shed
                    && matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                    && (files.shed() | pipes.shed()) =>
            {
                log::warn!(
                    "out of file descriptors: closed half of the open-file cache and of the \
                     idle pipes"
                );
                shed = true;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < OPEN_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(status_of(&e)),
        }
    }
}

/// The status for a failed open: missing or refused-by-resolution paths
/// are 404, permissions 403, renames racing every try 503, anything else
/// 500.
fn status_of(e: &io::Error) -> u16 {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => 403,
        Some(
            libc::ENOENT
            | libc::ENOTDIR
            | libc::EXDEV
            | libc::ELOOP
            | libc::ENAMETOOLONG
            | libc::EINVAL
            | libc::ENXIO,
        ) => 404,
        Some(libc::EAGAIN) => {
            log::warn!("open for an HTTP request kept racing with renames: {e}");
            503
        }
        _ => {
            log::warn!("open for an HTTP request failed: {e}");
            500
        }
    }
}
