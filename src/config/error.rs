//! `ConfigError` and the byte-offset → line/column arithmetic behind it.
//!
//! Every complaint about the config file is meant to be acted on from the
//! terminal, so it carries the file name and, when it is about a place in
//! the file, the 1-based line and column of the key or value at fault:
//! `FILE:LINE:COL: MESSAGE` (the shape compilers use, which editors can
//! jump to). Other failures read `FILE: MESSAGE`; I/O failures read
//! `FILE: cannot read: <os error>`.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub struct ConfigError {
    path: PathBuf,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The file could not be read at all.
    Io(io::Error),
    /// A problem at a place in the file (1-based line and column).
    At {
        line: usize,
        col: usize,
        message: String,
    },
    /// A problem with the file as a whole.
    Whole(String),
}

impl ConfigError {
    pub(super) fn io(path: &Path, err: io::Error) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            kind: Kind::Io(err),
        }
    }

    /// An error at byte `offset` of `text` (the contents of `path`).
    pub(super) fn at(path: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        ConfigError {
            path: path.to_path_buf(),
            kind: Kind::At {
                line,
                col,
                message: message.into(),
            },
        }
    }

    pub(super) fn whole(path: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            kind: Kind::Whole(message.into()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            Kind::Io(err) => write!(f, "{path}: cannot read: {err}"),
            Kind::At { line, col, message } => write!(f, "{path}:{line}:{col}: {message}"),
            Kind::Whole(message) => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Io(err) => Some(err),
            _ => None,
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
///
/// Columns count characters, not bytes, so a multi-byte character before
/// the offset counts once. An offset past the end points just after the
/// last character; an offset inside a multi-byte character points at that
/// character. Never panics.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1; // terminates: 0 is always a boundary
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// The text being loaded, with the path it came from, so validation code
/// can turn a span into a located error in one call.
pub(super) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// An error located at the start of `span`.
    pub fn error(&self, span: &Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.path, self.text, span.start, message)
    }

    /// An error about the file as a whole (no location).
    pub fn whole(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::whole(self.path, message)
    }

    /// "line L, column C" for pointing at an earlier place from a message.
    pub fn position(&self, span: &Range<usize>) -> String {
        let (line, col) = line_col(self.text, span.start);
        format!("line {line}, column {col}")
    }

    /// Just the 1-based line of `span`.
    pub fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_basics() {
        let text = "ab\ncd\n\nxyz";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 1), (1, 2));
        assert_eq!(line_col(text, 2), (1, 3)); // the newline itself
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 6), (3, 1));
        assert_eq!(line_col(text, 7), (4, 1));
        assert_eq!(line_col(text, 9), (4, 3));
        assert_eq!(line_col(text, 10), (4, 4)); // end of text
        assert_eq!(line_col(text, 1000), (4, 4)); // past the end: clamped
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("", 5), (1, 1));
    }

    #[test]
    fn line_col_counts_characters_not_bytes() {
        let text = "name = \"é\u{1F600}\" x";
        let x = text.find('x').unwrap();
        assert_eq!(line_col(text, x), (1, 13));
        // An offset inside a multi-byte character points at that character.
        let e = text.find('é').unwrap();
        assert_eq!(line_col(text, e + 1), (1, 9));
    }

    #[test]
    fn line_col_with_crlf() {
        let text = "a = 1\r\nb = 2";
        assert_eq!(line_col(text, text.find('b').unwrap()), (2, 1));
    }

    #[test]
    fn display_formats() {
        let path = Path::new("dir/x.toml");
        let e = ConfigError::at(path, "a\nbcd", 4, "bad thing: expected good");
        assert_eq!(e.to_string(), "dir/x.toml:2:3: bad thing: expected good");
        let e = ConfigError::whole(path, "no routes");
        assert_eq!(e.to_string(), "dir/x.toml: no routes");
        let e = ConfigError::io(path, io::Error::from_raw_os_error(2));
        assert_eq!(
            e.to_string(),
            "dir/x.toml: cannot read: No such file or directory (os error 2)"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
