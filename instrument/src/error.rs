//! The one error type of the crate: what went wrong, where in the input, and
//! whether the input or the instrumenter is to blame.
//!
//! Every failure of [`crate::instrument`] and of the metadata reader in
//! [`crate::abi`] is an [`Error`]; callers branch on [`Error::kind`], never on
//! the message text.

use std::fmt;

/// What kind of failure an [`Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input is not a valid WebAssembly module (truncated, malformed, or
    /// failing validation).
    Invalid,
    /// The input is valid WebAssembly but uses something the instrumenter does
    /// not handle (SIMD, exceptions, a second memory, memory64, GC, tail calls,
    /// a component, ...).
    Unsupported,
    /// The input already uses a name the instrumenter must add (an export or
    /// an import in the `upstare` namespace).
    Conflict,
    /// Resume-point metadata or a frame could not be read: truncated, or
    /// written by an unknown version of the format.
    Metadata,
    /// The instrumenter produced a module that does not validate. This is a
    /// bug in the instrumenter, reported instead of a panic.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Invalid => "invalid wasm",
            ErrorKind::Unsupported => "unsupported wasm",
            ErrorKind::Conflict => "name conflict",
            ErrorKind::Metadata => "bad upstare metadata",
            ErrorKind::Internal => "internal instrumenter error",
        })
    }
}

/// An instrumentation or metadata failure, with the byte offset in the input
/// where it was found when there is one.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    offset: Option<usize>,
    message: String,
    #[source]
    source: Option<wasmparser::BinaryReaderError>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset:#x}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Error {
    /// Builds an error of `kind` with a message and an optional input offset.
    pub(crate) fn new(kind: ErrorKind, offset: Option<usize>, message: impl Into<String>) -> Self {
        Error {
            kind,
            offset,
            message: one_line(message.into()),
            source: None,
        }
    }

    /// Wraps a parser or validator error, keeping its offset and reason.
    pub(crate) fn from_reader(kind: ErrorKind, err: wasmparser::BinaryReaderError) -> Self {
        Error {
            kind,
            offset: Some(err.offset()),
            message: one_line(err.message().to_string()),
            source: Some(err),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The byte offset in the input module (or metadata payload) where the
    /// problem was found, if known.
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }

    /// The reason, without the kind and offset prefix.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Some parser messages embed pretty-printed values across lines; an error
/// is shown as one line (the command prints `error: ...`), so line breaks
/// and the indentation after them become single spaces.
fn one_line(message: String) -> String {
    if !message.contains('\n') {
        return message;
    }
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn unsupported(offset: Option<usize>, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, offset, message)
}

pub(crate) fn internal(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Internal, None, message)
}
