//! Baseline strategy: read(2) into a user-space buffer, write(2) it out.
//!
//! This is the "four copies" path of the classic article, kept as the
//! fallback when splice cannot run (no pipe left, a socket splice refuses)
//! and as the cheaper choice for small exchanges. The buffer comes from the
//! worker's `BufPool` and goes back as soon as it is empty, so an idle
//! connection holds no buffer at all.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use mio::net::TcpStream;

use super::Pump;
use crate::sys;

pub struct CopyPump {
    pub buf: Box<[u8]>,
    /// Unsent bytes are `buf[start..end]`.
    pub start: usize,
    pub end: usize,
}

impl CopyPump {
    pub fn new(buf: Box<[u8]>) -> Self {
        CopyPump {
            buf,
            start: 0,
            end: 0,
        }
    }
}

impl Pump for CopyPump {
    fn pending(&self) -> usize {
        self.end - self.start
    }

    fn room(&self) -> usize {
        self.buf.len() - self.end
    }

    fn fill(&mut self, mut src: &TcpStream) -> io::Result<usize> {
        let n = src.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    fn flush(&mut self, mut dst: &TcpStream, last: bool) -> io::Result<usize> {
        let bytes = &self.buf[self.start..self.end];
        let n = if last {
            sys::send(dst.as_fd(), bytes, true)?
        } else {
            dst.write(bytes)?
        };
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(n)
    }
}
