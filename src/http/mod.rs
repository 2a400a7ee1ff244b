//! HTTP/1.x static serving, as pure functions the file session calls:
//! `request` parses a request head with httparse and applies sluice's
//! limits, `path` maps a request target to a safe relative path beneath a
//! route's root, `cond` decides conditionals (304) and byte ranges (206,
//! 416), `response` writes response heads. Nothing here touches a socket
//! or a file, so every rule has unit tests; `file_conn` does the I/O.

pub mod cond;
pub mod path;
pub mod request;
pub mod response;

/// Longest request target accepted (414 above).
pub const MAX_TARGET: usize = 8 * 1024;
/// Longest request head accepted (431 above).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in one request (431 above).
pub const MAX_HEADERS: usize = 64;
