//! The control protocol: what a client asks a running host and what the host
//! answers, as types. Text exists only on the wire: one request line from the
//! client, then the host's reply, whose last line says how the request ended.
//!
//! ```text
//! STATUS              ->  key: value lines, then OK
//! CHECKPOINT <path>   ->  OK <path> <bytes> bytes, paused <us> us
//! UPDATE <ms> <path>  ->  report lines, then OK
//! ROLLBACK <ms>       ->  report lines, then OK
//! any request         ->  ERR <reason>  (refused: the program runs on as before)
//!                         BAD <reason>  (the input cannot be used at all)
//!                         BUG <reason>  (an internal error: the program runs on)
//! ```

use std::path::PathBuf;

/// The longest request line a host reads, in bytes; longer lines are refused
/// without being buffered whole.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Describe the running program.
    Status,
    /// Write a snapshot to this path (on the host's file system).
    Checkpoint(PathBuf),
    /// Update the program to the module at this path, waiting at most this
    /// many milliseconds for frames that cannot move yet to leave the stack.
    Update(PathBuf, u64),
    /// Return to the previous version, with the same wait.
    Rollback(u64),
}

/// The host's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The request was carried out: body lines (a status, an update report)
    /// and, for requests that have one, a one-line summary.
    Done {
        /// Lines printed before the summary.
        body: Vec<String>,
        /// The summary that follows `OK` on its line.
        summary: Option<String>,
    },
    /// The request was refused; the program runs on as it was.
    Refused(String),
    /// What the request names cannot be used (an unreadable or invalid module).
    Unusable(String),
    /// The host failed where it should not have: a bug, reported instead of
    /// a crash. The program runs on as it was.
    Internal(String),
}

/// A request or reply that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The line is empty.
    #[error("empty request (expected STATUS, CHECKPOINT <path>, UPDATE <ms> <path> or ROLLBACK <ms>)")]
    Empty,
    /// The verb is not one the host knows.
    #[error("unknown request `{0}` (expected STATUS, CHECKPOINT <path>, UPDATE <ms> <path> or ROLLBACK <ms>)")]
    UnknownVerb(String),
    /// A verb without the argument it needs.
    #[error("{verb} needs {what}")]
    Missing {
        /// The request's verb.
        verb: &'static str,
        /// What is missing, in words.
        what: &'static str,
    },
    /// A verb that takes no argument was given one.
    #[error("{0} takes no argument")]
    Unexpected(&'static str),
    /// A timeout that is not a number of milliseconds.
    #[error("{verb} needs a timeout in milliseconds, not `{given}`")]
    BadTimeout {
        /// The request's verb.
        verb: &'static str,
        /// What was given instead.
        given: String,
    },
    /// A request line longer than [`MAX_REQUEST_LINE`].
    #[error("request line longer than {MAX_REQUEST_LINE} bytes")]
    TooLong,
    /// A request line that is not UTF-8.
    #[error("request line is not UTF-8")]
    NotUtf8,
    /// A line break or NUL inside a request, which one line cannot carry
    /// (a path holding one cannot be named to the host).
    #[error("a request cannot contain a line break or NUL")]
    ControlCharacter,
    /// A reply whose last line is none of OK, ERR, BAD or BUG.
    #[error("unexpected reply from the host: {0:?}")]
    BadReply(String),
}

impl Request {
    /// Parses a request line (its line ending is optional).
    pub fn parse(line: &str) -> Result<Request, ProtocolError> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Err(ProtocolError::Empty);
        }
        if line.contains(['\r', '\n', '\0']) {
            return Err(ProtocolError::ControlCharacter);
        }
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        match verb {
            "STATUS" if rest.is_empty() => Ok(Request::Status),
            "STATUS" => Err(ProtocolError::Unexpected("STATUS")),
            "CHECKPOINT" if rest.is_empty() => Err(ProtocolError::Missing { verb: "CHECKPOINT", what: "a file path" }),
            "CHECKPOINT" => Ok(Request::Checkpoint(PathBuf::from(rest))),
            "UPDATE" => {
                let (ms, path) = rest
                    .split_once(' ')
                    .filter(|(_, path)| !path.is_empty())
                    .ok_or(ProtocolError::Missing { verb: "UPDATE", what: "a timeout and a module path" })?;
                Ok(Request::Update(PathBuf::from(path), timeout("UPDATE", ms)?))
            }
            "ROLLBACK" if rest.is_empty() => Err(ProtocolError::Missing { verb: "ROLLBACK", what: "a timeout" }),
            "ROLLBACK" => Ok(Request::Rollback(timeout("ROLLBACK", rest)?)),
            _ => Err(ProtocolError::UnknownVerb(verb.escape_debug().to_string())),
        }
    }

    /// The request line, newline included, if the request can be sent:
    /// its path holds no line break or NUL.
    pub fn encode(&self) -> Result<String, ProtocolError> {
        let line = self.line();
        match line.trim_end_matches('\n').contains(['\r', '\n', '\0']) {
            true => Err(ProtocolError::ControlCharacter),
            false => Ok(line),
        }
    }

    /// The request line, newline included, as [`Request::encode`] checks it.
    fn line(&self) -> String {
        match self {
            Request::Status => "STATUS\n".into(),
            Request::Checkpoint(p) => format!("CHECKPOINT {}\n", p.display()),
            Request::Update(p, ms) => format!("UPDATE {ms} {}\n", p.display()),
            Request::Rollback(ms) => format!("ROLLBACK {ms}\n"),
        }
    }
}

fn timeout(verb: &'static str, given: &str) -> Result<u64, ProtocolError> {
    given.parse().map_err(|_| ProtocolError::BadTimeout { verb, given: given.escape_debug().to_string() })
}

impl Response {
    /// A refusal with its reason.
    pub fn refused(reason: impl std::fmt::Display) -> Response {
        Response::Refused(reason.to_string())
    }

    /// Whether the request was carried out.
    pub fn is_done(&self) -> bool {
        matches!(self, Response::Done { .. })
    }

    /// The reply as sent: body lines, then the status line, newline-ended.
    /// Reasons and summaries are kept to one line, since the last line is
    /// the one that says how the request ended.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let last = match self {
            Response::Done { body, summary } => {
                for line in body {
                    out.push_str(&one_line(line));
                    out.push('\n');
                }
                match summary {
                    Some(s) => format!("OK {}", one_line(s)),
                    None => "OK".into(),
                }
            }
            Response::Refused(reason) => format!("ERR {}", one_line(reason)),
            Response::Unusable(reason) => format!("BAD {}", one_line(reason)),
            Response::Internal(reason) => format!("BUG {}", one_line(reason)),
        };
        out.push_str(&last);
        out.push('\n');
        out
    }

    /// Reads a reply as [`Response::encode`] writes it.
    pub fn decode(text: &str) -> Result<Response, ProtocolError> {
        let mut lines: Vec<&str> = text.trim_end_matches(['\r', '\n']).lines().collect();
        let last = lines.pop().unwrap_or("");
        let body = || lines.iter().map(|l| l.to_string()).collect();
        if last == "OK" {
            Ok(Response::Done { body: body(), summary: None })
        } else if let Some(summary) = last.strip_prefix("OK ") {
            Ok(Response::Done { body: body(), summary: Some(summary.to_string()) })
        } else if let (Some(reason), true) = (last.strip_prefix("ERR "), lines.is_empty()) {
            Ok(Response::Refused(reason.to_string()))
        } else if let (Some(reason), true) = (last.strip_prefix("BAD "), lines.is_empty()) {
            Ok(Response::Unusable(reason.to_string()))
        } else if let (Some(reason), true) = (last.strip_prefix("BUG "), lines.is_empty()) {
            Ok(Response::Internal(reason.to_string()))
        } else {
            Err(ProtocolError::BadReply(text.to_string()))
        }
    }
}

fn one_line(text: &str) -> String {
    text.trim_end().replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_survives_its_own_line() {
        let requests = [
            Request::Status,
            Request::Checkpoint("/tmp/a snap".into()),
            Request::Update("/srv/app v2.wasm".into(), 1500),
            Request::Rollback(0),
        ];
        for r in requests {
            assert_eq!(Request::parse(&r.encode().unwrap()), Ok(r));
        }
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let cases: [(&str, ProtocolError); 10] = [
            ("", ProtocolError::Empty),
            ("\r\n", ProtocolError::Empty),
            ("status", ProtocolError::UnknownVerb("status".into())),
            ("STATUS now", ProtocolError::Unexpected("STATUS")),
            ("CHECKPOINT", ProtocolError::Missing { verb: "CHECKPOINT", what: "a file path" }),
            ("UPDATE 100", ProtocolError::Missing { verb: "UPDATE", what: "a timeout and a module path" }),
            ("UPDATE 100 ", ProtocolError::Missing { verb: "UPDATE", what: "a timeout and a module path" }),
            ("UPDATE soon a.wasm", ProtocolError::BadTimeout { verb: "UPDATE", given: "soon".into() }),
            ("ROLLBACK", ProtocolError::Missing { verb: "ROLLBACK", what: "a timeout" }),
            ("ROLLBACK -1", ProtocolError::BadTimeout { verb: "ROLLBACK", given: "-1".into() }),
        ];
        for (line, want) in cases {
            assert_eq!(Request::parse(line), Err(want), "{line:?}");
        }
        assert!(Request::parse("ROLLBACK 99999999999999999999999").is_err(), "overflowing timeout");
        let unknown = Request::parse("\u{1b}[2J").unwrap_err().to_string();
        assert!(!unknown.contains('\u{1b}'), "control characters are escaped in messages: {unknown}");
    }

    #[test]
    fn every_response_survives_its_encoding() {
        let responses = [
            Response::Done { body: vec![], summary: None },
            Response::Done { body: vec!["module: a".into(), "uptime: 1 s".into()], summary: None },
            Response::Done { body: vec!["functions: 2 changed".into()], summary: Some("/tmp/s 10 bytes".into()) },
            Response::Refused("update refused: f is on the stack".into()),
            Response::Unusable("cannot read a.wasm".into()),
            Response::Internal("the plan relinked, but not at 0x10000".into()),
        ];
        for r in responses {
            assert_eq!(Response::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn a_path_with_a_line_break_cannot_be_sent_or_received() {
        let forged = Request::Checkpoint("/tmp/x\nROLLBACK 0".into());
        assert_eq!(forged.encode(), Err(ProtocolError::ControlCharacter));
        assert_eq!(Request::parse("CHECKPOINT /tmp/x\rROLLBACK 0"), Err(ProtocolError::ControlCharacter));
        assert_eq!(Request::parse("UPDATE 5 a\0.wasm\n"), Err(ProtocolError::ControlCharacter));
    }

    #[test]
    fn a_reason_with_newlines_cannot_forge_a_status_line() {
        let r = Response::Refused("first\nOK".into());
        assert_eq!(Response::decode(&r.encode()), Ok(Response::Refused("first OK".into())));
        let done = Response::Done { body: vec!["a\nERR x".into()], summary: None };
        assert_eq!(done.encode(), "a ERR x\nOK\n");
    }

    #[test]
    fn replies_that_end_in_no_status_are_errors() {
        for text in ["", "\n", "module: a\n", "OK?\n", "line\nERR reason\n", "ok\n"] {
            assert!(matches!(Response::decode(text), Err(ProtocolError::BadReply(_))), "{text:?}");
        }
    }

    /// A short fuzz run (see docs/FUZZING.md): lines built from the
    /// protocol's own words and hostile characters. Parsing never panics,
    /// and whatever parses reads back the same from its own line.
    #[test]
    fn random_request_lines_parse_or_say_why() {
        let iters = std::env::var("UPSTARE_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000u64);
        let seed = std::env::var("UPSTARE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
        let mut rng = fastrand::Rng::with_seed(seed);
        let words = ["STATUS", "CHECKPOINT", "UPDATE", "ROLLBACK", " ", "  ", "0", "18446744073709551616", "-1", "/a b", "\r", "\n", "\u{0}", "\u{1b}", "é", "OK", "ERR"];
        for i in 0..iters {
            let line: String = (0..rng.usize(0..6)).map(|_| words[rng.usize(..words.len())]).collect();
            let parsed = std::panic::catch_unwind(|| Request::parse(&line))
                .unwrap_or_else(|_| panic!("line {i} {line:?} panicked; replay with UPSTARE_FUZZ_SEED={seed}"));
            match parsed {
                Ok(request) => {
                    let again = request.encode().unwrap_or_else(|e| panic!("{request:?} parsed but cannot be sent: {e} (seed {seed})"));
                    assert_eq!(Request::parse(&again), Ok(request), "{line:?} (seed {seed})");
                }
                Err(e) => assert!(!e.to_string().contains('\n'), "one-line error for {line:?}: {e} (seed {seed})"),
            }
            let reply = Response::Refused(line.clone());
            assert_eq!(Response::decode(&reply.encode()), Ok(Response::Refused(one_line(&line))), "{line:?} (seed {seed})");
        }
    }
}
