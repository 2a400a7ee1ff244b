//! Answering one parsed HTTP request: map the target to a file (with
//! the path rules of `http::path` and openat2 beneath the route's root),
//! decide the status (304, 206, 416, 301, 404...) with `http::cond`, and
//! queue the response head and body on the session. No I/O on the socket
//! happens here; `FileConn::drive` sends what this queues.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use super::{FileConn, Resp, leased_size, open_file, pools};
use crate::config::{FileRoute, FileSource};
use crate::conn::Ctx;
use crate::http::cond::{self, Span, Validators};
use crate::http::path;
use crate::http::request::{Method, Request};
use crate::http::response::{self, Head};
use crate::pump::file::Body;
use crate::sys;

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
        let (file, meta, name) = match self.open_target(f, &req.target) {
            Ok(v) => v,
            Err(301) => {
                // A folder named without its trailing slash: send the
                // client to the slash form, so relative links in the index
                // resolve inside the folder. The location is rebuilt from
                // the checked path, never copied from the request.
                let loc = path::resolve(&req.target, f.dotfiles)
                    .map(|rel| path::dir_location(&rel))
                    .unwrap_or_else(|_| "/".into());
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
        let v = Validators::new(meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        if cond::not_modified(
            &v,
            req.if_none_match.as_deref(),
            req.if_modified_since.as_deref(),
        ) {
            let head = Head::new(minor, 304)
                .header("ETag", &v.etag)
                .header("Last-Modified", v.last_modified())
                .finish(minor, keep);
            self.resp = Some(resp(head, None, keep, 304, ctx.now).named(&req));
            return;
        }
        let mut size = meta.len();
        let mut body = None;
        if !head_only {
            let mut pools = pools(ctx);
            let b = Body::open(file, &self.params, &mut pools);
            // With a lease the size cannot change any more: read it again.
            size = leased_size(&b).unwrap_or(size);
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
            .header("Content-Type", response::content_type(&name))
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

    /// Open the file a target names. `Err(status)` when it cannot be
    /// served. Returns the file and the name its type is guessed from.
    fn open_target(&self, f: &FileRoute, target: &str) -> Result<(File, Metadata, PathBuf), u16> {
        let (file, meta, name) = match &f.source {
            // One file: every target gets it.
            FileSource::File(p) => {
                let file = open_file(p).map_err(|e| status_of(&e))?;
                let meta = file.metadata().map_err(|e| status_of(&e))?;
                (file, meta, p.clone())
            }
            FileSource::Root(_) => {
                let rel = path::resolve(target, f.dotfiles)?;
                let root = self.route.root.as_ref().ok_or(500u16)?;
                let fd = sys::file::open_beneath(root.as_fd(), &rel).map_err(|e| status_of(&e))?;
                let file = File::from(fd);
                let meta = file.metadata().map_err(|e| status_of(&e))?;
                if meta.is_dir() {
                    // No listings: the index file, or nothing.
                    let index = f.index.as_ref().ok_or(404u16)?;
                    let path = target.split(['?', '#']).next().unwrap_or_default();
                    if !path.ends_with('/') {
                        return Err(301);
                    }
                    let rel = rel.join(index);
                    let fd =
                        sys::file::open_beneath(root.as_fd(), &rel).map_err(|e| status_of(&e))?;
                    let file = File::from(fd);
                    let meta = file.metadata().map_err(|e| status_of(&e))?;
                    (file, meta, rel)
                } else {
                    (file, meta, rel)
                }
            }
        };
        if !meta.is_file() {
            return Err(404); // a FIFO, device or socket is never served
        }
        Ok((file, meta, name))
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

/// The status for a failed open: missing or refused-by-resolution paths
/// are 404, permissions 403, anything else 500.
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
        _ => {
            log::warn!("open for an HTTP request failed: {e}");
            500
        }
    }
}
