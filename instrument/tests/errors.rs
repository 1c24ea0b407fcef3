//! Bad input: every malformed, invalid or unsupported module is refused with
//! an [`Error`] of the right kind, an offset where the input has one, and a
//! message, never a panic; the command line reports it in one line and exits
//! with status 2.

use std::process::Command;

use upstare_instrument::{instrument, Error, ErrorKind, Options};

fn refuse(wasm: &[u8]) -> Error {
    match instrument(wasm, &Options::default()) {
        Ok(_) => panic!("accepted a bad module"),
        Err(e) => e,
    }
}

fn refuse_wat(wat: &str) -> Error {
    refuse(&wat::parse_str(wat).expect("test wat parses"))
}

fn assert_error(e: &Error, kind: ErrorKind, offset: bool) {
    assert_eq!(e.kind(), kind, "{e}");
    assert_eq!(e.offset().is_some(), offset, "offset of {e}");
    assert!(!e.message().is_empty(), "{e:?}");
    let shown = e.to_string();
    assert!(shown.contains(e.message()), "{shown}");
    assert!(!shown.contains('\n'), "{shown}");
}

const VALID: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $g (mut i32) (i32.const 0))
  (data (i32.const 8) "abc")
  (func (export "_start")
    (local $i i32)
    (loop $l
      i32.const 1 i32.const 8 i32.const 1 i32.const 0
      call $w
      drop
      local.get $i
      i32.const 1
      i32.add
      local.tee $i
      i32.const 10
      i32.lt_u
      br_if $l)))"#;

#[test]
fn empty_input_is_invalid() {
    assert_error(&refuse(&[]), ErrorKind::Invalid, true);
}

#[test]
fn truncated_modules_are_invalid() {
    let wasm = wat::parse_str(VALID).expect("wat");
    assert!(instrument(&wasm, &Options::default()).is_ok());
    let mut cuts: Vec<usize> = vec![1, 4, 7, 9, 12, wasm.len() / 3, wasm.len() / 2, wasm.len() - 5, wasm.len() - 1];
    cuts.extend((9..wasm.len()).step_by(7));
    for cut in cuts {
        // A cut between two sections leaves a valid, shorter module.
        if wasmparser::validate(&wasm[..cut]).is_ok() {
            continue;
        }
        let e = refuse(&wasm[..cut]);
        assert_error(&e, ErrorKind::Invalid, true);
        assert!(e.offset().unwrap() <= cut, "cut at {cut}: offset {:?} past the end", e.offset());
    }
}

#[test]
fn garbage_is_invalid() {
    assert_error(&refuse(b"this is not wasm at all"), ErrorKind::Invalid, true);
    assert_error(&refuse(&[0xff; 64]), ErrorKind::Invalid, true);
    // A good header followed by noise.
    let mut noise = b"\0asm\x01\0\0\0".to_vec();
    noise.extend((0u32..200).map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8));
    assert_error(&refuse(&noise), ErrorKind::Invalid, true);
}

#[test]
fn type_errors_are_invalid_at_their_offset() {
    let wasm = wat::parse_str(r#"(module (func (result i32) i64.const 1))"#).expect("wat");
    // wat checks nothing, so the bytes carry the type error.
    let e = refuse(&wasm);
    assert_error(&e, ErrorKind::Invalid, true);
    let at = e.offset().unwrap();
    assert!(at > 8 && at < wasm.len(), "offset {at} outside the code");
    assert!(e.message().contains("type mismatch"), "{e}");
}

#[test]
fn unsupported_features_are_named_as_such() {
    let cases = [
        ("simd", r#"(module (func (result i32) v128.const i64x2 0 0 i32x4.extract_lane 0))"#),
        ("second memory", r#"(module (memory 1) (memory 1))"#),
        ("memory64", r#"(module (memory i64 1))"#),
        ("exception tag", r#"(module (tag (param i32)))"#),
        ("tail call", r#"(module (func $f return_call $f))"#),
        ("gc type", r#"(module (type (struct (field i32))))"#),
        ("component", r#"(component)"#),
    ];
    for (what, wat) in cases {
        let e = refuse_wat(wat);
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{what}: {e}");
        assert!(e.offset().is_some(), "{what}: no offset in {e}");
        assert!(!e.message().is_empty(), "{what}");
    }
}

#[test]
fn instrumented_modules_are_refused() {
    let wasm = wat::parse_str(VALID).expect("wat");
    let once = instrument(&wasm, &Options::default()).expect("instrument");
    let e = refuse(&once.wasm);
    assert_error(&e, ErrorKind::Conflict, true);
    assert!(e.message().contains("instrumented already"), "{e}");
    // So is a module that merely exports a reserved name.
    let e = refuse_wat(r#"(module (func (export "upstare_state")))"#);
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
}

fn run_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_upstare-instrument")).args(args).output().expect("run the binary")
}

fn assert_cli_error(out: &std::process::Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(mentions), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_reports_a_bad_file_in_one_line() {
    let dir = std::env::temp_dir().join(format!("upstare-instrument-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("bad.wasm");
    let output = dir.join("out.wasm");
    std::fs::write(&input, b"\0asm\x01\0\0\0\x01\xff").expect("write input");
    let out = run_cli(&[input.as_os_str(), "-o".as_ref(), output.as_os_str()]);
    assert_cli_error(&out, "bad.wasm");
    assert!(!output.exists(), "wrote output for a bad module");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_reports_a_missing_file_in_one_line() {
    let dir = std::env::temp_dir().join(format!("upstare-instrument-missing-{}", std::process::id()));
    let input = dir.join("missing.wasm");
    let output = dir.join("out.wasm");
    let out = run_cli(&[input.as_os_str(), "-o".as_ref(), output.as_os_str()]);
    assert_cli_error(&out, "missing.wasm");
}

#[test]
fn cli_instruments_a_good_file() {
    let dir = std::env::temp_dir().join(format!("upstare-instrument-good-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("good.wasm");
    let output = dir.join("out.wasm");
    std::fs::write(&input, wat::parse_str(VALID).expect("wat")).expect("write input");
    let out = run_cli(&[input.as_os_str(), "-o".as_ref(), output.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read(&output).expect("output written");
    upstare_instrument::Metadata::from_module(&written).expect("metadata in the output");
    std::fs::remove_dir_all(&dir).ok();
}

/// Byte flips, insertions and cuts of a valid module: each result is either
/// instrumented (and then validates, which `instrument` checks) or refused
/// as bad input, never a panic or an internal error.
#[test]
fn mutated_modules_never_panic() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut subjects = vec![wat::parse_str(VALID).expect("wat")];
    while subjects.len() < 12 {
        let data: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        let mut config = wasm_smith::Config::default();
        (config.simd_enabled, config.exceptions_enabled, config.gc_enabled) = (false, false, false);
        (config.tail_call_enabled, config.memory64_enabled, config.max_memories) = (false, false, 1);
        if let Ok(m) = wasm_smith::Module::new(config, &mut arbitrary::Unstructured::new(&data)) {
            subjects.push(m.to_bytes());
        }
    }
    let (mut ok, mut refused) = (0, 0);
    for i in 0..6000 {
        let wasm = &subjects[i % subjects.len()];
        let mut m = wasm.clone();
        if m.len() <= 8 {
            continue;
        }
        for _ in 0..1 + next() % 3 {
            let at = 8 + (next() as usize) % (m.len() - 8);
            match next() % 3 {
                0 => m[at] = next() as u8,
                1 => m[at] ^= 1 << (next() % 8),
                _ => m.insert(at, next() as u8),
            }
        }
        match instrument(&m, &Options::default()) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Invalid | ErrorKind::Unsupported | ErrorKind::Conflict),
                    "{e}"
                );
                assert!(!e.to_string().contains('\n'), "{e}");
                refused += 1;
            }
        }
    }
    assert!(ok > 0 && refused > 0, "{ok} instrumented, {refused} refused");
}
