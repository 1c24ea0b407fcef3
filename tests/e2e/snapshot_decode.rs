//! The snapshot decoder past its checksum: files whose checksum is right
//! but whose structure is not (a hand-edited or buggy writer's output) are
//! refused with the reason, by the decoder or by the restore, never with a
//! panic; and random edits of a resealed snapshot (a short fuzz run, see
//! docs/FUZZING.md) never panic either.

use std::time::Duration;

use sha2::{Digest, Sha256};
use upstare_host::{new_engine, Guest, GuestConfig, GuestModule, Snapshot, SnapshotError};
use upstare_tests::{guest, host_command, instrumented, TempDir};

use crate::snapshot::checkpoint;

/// `body` with the checksum it needs.
fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    body
}

/// Where the argument count starts: after magic, version, hash and module.
fn args_at(snapshot: &Snapshot) -> usize {
    16 + 4 + 32 + 8 + snapshot.module.len()
}

/// A real snapshot of compute, paused mid-run, with no arguments,
/// environment or fds: a known layout to edit.
fn bare_snapshot() -> Snapshot {
    let dir = TempDir::new("snapshot-decode");
    let (bytes, _) = checkpoint(Duration::from_millis(30), &dir);
    let mut snapshot = Snapshot::decode(&bytes).unwrap();
    snapshot.args.clear();
    snapshot.env.clear();
    snapshot.fds.clear();
    snapshot
}

/// Replaces the three counts (args, env, fds) of `snapshot`'s encoding by
/// `tables`, which must encode all three, and seals it.
fn with_tables(snapshot: &Snapshot, tables: &[u8]) -> Vec<u8> {
    let bytes = snapshot.encode();
    let at = args_at(snapshot);
    let body = &bytes[..bytes.len() - 32];
    seal([&body[..at], tables, &body[at + 12..]].concat())
}

fn corrupt(bytes: &[u8]) -> &'static str {
    match Snapshot::decode(bytes) {
        Err(SnapshotError::Corrupt(reason)) => reason,
        other => panic!("expected a damaged snapshot, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn well_sealed_but_malformed_snapshots_are_refused_by_the_decoder() {
    let snapshot = bare_snapshot();
    let none = 0u32.to_le_bytes();
    let fd_record = |kind: &[u8]| [&1u32.to_le_bytes()[..], &3u32.to_le_bytes(), &0u16.to_le_bytes(), kind].concat();
    let string = |s: &[u8]| [&(s.len() as u32).to_le_bytes()[..], s].concat();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("an fd of an unknown kind", [&none[..], &none, &fd_record(&[9])].concat(), "unknown fd kind"),
        ("an argument that is not UTF-8", [&1u32.to_le_bytes()[..], &string(&[0xff, 0xfe]), &none, &none].concat(), "string is not UTF-8"),
        ("more arguments than bytes", [&u32::MAX.to_le_bytes()[..], &none, &none].concat(), "truncated"),
        ("a string longer than the file", [&1u32.to_le_bytes()[..], &u32::MAX.to_le_bytes(), &none, &none].concat(), "truncated"),
        ("a listener that is no address", [&none[..], &none, &fd_record(&[&[4u8][..], &string(b"nowhere")].concat())].concat(), "listener address"),
    ];
    for (what, tables, reason) in cases {
        assert_eq!(corrupt(&with_tables(&snapshot, &tables)), reason, "{what}");
    }

    let mut module = snapshot.clone();
    module.module[100] ^= 1;
    assert_eq!(corrupt(&module.encode()), "the embedded module does not match its hash");

    let mut frames = snapshot.clone();
    frames.frames = vec![1, 2, 3];
    assert_eq!(corrupt(&frames.encode()), "unreadable frame stack");
    let mut trailer = snapshot.clone();
    let last = trailer.frames.len() - 1;
    trailer.frames[last] ^= 0x40;
    assert_eq!(corrupt(&trailer.encode()), "unreadable frame stack");

    // A thread whose frame stack does not parse.
    let mut thread = snapshot.clone();
    thread.threads.push(upstare_host::snapshot::ThreadSnapshot { tid: 1, arg: 0, globals: Vec::new(), frames: vec![1, 2, 3] });
    assert_eq!(corrupt(&thread.encode()), "unreadable frame stack");

    // A process whose frame stack does not parse.
    let mut process = snapshot.clone();
    process.processes.push(upstare_host::snapshot::ProcessSnapshot {
        pid: 2,
        parent: 1,
        ended: None,
        fds: Vec::new(),
        globals: Vec::new(),
        memory: Vec::new(),
        frames: vec![1, 2, 3],
    });
    assert_eq!(corrupt(&process.encode()), "unreadable frame stack");

    // Globals: a u32 count, then 13 bytes each (index u32, type u8, bits
    // u64), before the memory and frame blobs, the thread and process
    // counts, the layout and the checksum.
    let bytes = snapshot.encode();
    let n = snapshot.globals.len();
    let count_at = bytes.len() - 32 - 32 - 4 - 4 - (8 + snapshot.frames.len()) - (8 + snapshot.memory.len()) - 13 * n - 4;
    assert_eq!(u32::from_le_bytes(bytes[count_at..count_at + 4].try_into().unwrap()) as usize, n, "the layout this test edits");
    let mut bad_type = bytes[..bytes.len() - 32].to_vec();
    bad_type[count_at + 4 + 4] = 0x99;
    assert_eq!(corrupt(&seal(bad_type)), "unknown global type");

    let mut trailing = bytes[..bytes.len() - 32].to_vec();
    trailing.push(0);
    assert_eq!(corrupt(&seal(trailing)), "trailing bytes");
}

#[test]
fn snapshots_that_decode_but_do_not_fit_the_module_are_refused_by_the_restore() {
    let snapshot = bare_snapshot();
    let engine = new_engine().unwrap();
    let module = GuestModule::load_with(&engine, &guest("compute"), &instrumented()).unwrap();
    let restore = |s: &Snapshot| match Guest::restore(&engine, &module, GuestConfig::new(vec![]), s) {
        Err(SnapshotError::Corrupt(reason)) => reason,
        Err(other) => panic!("expected a damaged snapshot, got {other}"),
        Ok(_) => panic!("the restore accepted it"),
    };
    assert!(Guest::restore(&engine, &module, GuestConfig::new(vec![]), &snapshot).is_ok(), "the unedited snapshot restores");

    let mut memory = snapshot.clone();
    memory.memory.pop();
    assert_eq!(restore(&memory), "memory size is not a whole number of pages above the module's minimum");
    let mut global = snapshot.clone();
    global.globals.push((9999, upstare_instrument::abi::ValType::I32, 0));
    assert_eq!(restore(&global), "a global the module does not have");
    let mut function = snapshot.clone();
    // The innermost frame's function index (the first word of a frame).
    function.frames[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(restore(&function), "frames the module's metadata does not describe");
    let mut empty = snapshot.clone();
    empty.frames.clear();
    assert_eq!(restore(&empty), "no frames");
    let mut threads = snapshot.clone();
    threads.threads.push(upstare_host::snapshot::ThreadSnapshot { tid: 1, arg: 0, globals: Vec::new(), frames: snapshot.frames.clone() });
    assert_eq!(restore(&threads), "threads recorded for a module that starts none");

    // The same through the command line.
    let stderr = refused_by_the_command_line(&empty.encode());
    assert!(stderr.contains("the snapshot is damaged: no frames"), "{stderr}");
}

/// What `upstare-host restore` says of a snapshot file of `bytes`, having
/// refused it as it must: one line, status 2, no panic.
fn refused_by_the_command_line(bytes: &[u8]) -> String {
    let dir = TempDir::new("snapshot-restore-refused");
    let path = dir.0.join("refused.snap");
    std::fs::write(&path, bytes).unwrap();
    let out = host_command().args(["restore", path.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// Frames mean what the instrumenter that saved them said: a snapshot
/// whose frames another instrumenter laid out (or that does not say,
/// format 3) is refused before anything is restored, even where its frames
/// would parse.
#[test]
fn a_snapshot_whose_frames_another_instrumenter_laid_out_is_refused() {
    let snapshot = bare_snapshot();
    let engine = new_engine().unwrap();
    let module = GuestModule::load_with(&engine, &guest("compute"), &instrumented()).unwrap();
    let layout = |s: &Snapshot| match Guest::restore(&engine, &module, GuestConfig::new(vec![]), s) {
        Err(e @ SnapshotError::OtherLayout { .. }) => e.to_string(),
        Err(other) => panic!("expected another layout, got {other}"),
        Ok(_) => panic!("the restore accepted it"),
    };
    let mut other = snapshot.clone();
    other.frames_layout.as_mut().expect("a layout")[0] ^= 1;
    assert!(layout(&other).contains("another version of UpStare"), "{}", layout(&other));
    // Format 3 had no layout; it still decodes, and says so when written.
    let mut old = snapshot.clone();
    old.frames_layout = None;
    let bytes = old.encode();
    assert_eq!(bytes[16..20], 3u32.to_le_bytes());
    assert_eq!(Snapshot::decode(&bytes).unwrap(), old);
    assert!(layout(&old).contains("format 3 or before"), "{}", layout(&old));
    let stderr = refused_by_the_command_line(&bytes);
    assert!(stderr.contains("resume it with the version that took it"), "{stderr}");
}

/// How many random edits the fuzz tests below try, and from which seed:
/// `UPSTARE_FUZZ_ITERS` and `UPSTARE_FUZZ_SEED` run them longer or replay
/// one (the seed is printed on failure).
pub(crate) fn fuzz_budget(default_iters: u64) -> (u64, u64) {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is not a number")));
    let seed = var("UPSTARE_FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..));
    (var("UPSTARE_FUZZ_ITERS").unwrap_or(default_iters), seed)
}

/// Random edits of the structured parts of a sealed snapshot (everything
/// but the memory, where any bytes are valid): decoding and restoring
/// either succeed or say why.
#[test]
fn randomly_edited_sealed_snapshots_never_panic() {
    let (iters, seed) = fuzz_budget(300);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut snapshot = bare_snapshot();
    snapshot.args = vec!["compute".into(), "400".into()];
    snapshot.env = vec![("A".into(), "b".into())];
    let bytes = snapshot.encode();
    let body = &bytes[..bytes.len() - 32];
    // The thread and process counts (none) and the layout end the body,
    // after the frames.
    let end = body.len() - 32;
    let tables = args_at(&snapshot)..end - 4 - 8 - snapshot.frames.len() - 8 - snapshot.memory.len();
    let frames = end - 4 - snapshot.frames.len() - 16..end;
    let engine = new_engine().unwrap();
    let module = GuestModule::load_with(&engine, &guest("compute"), &instrumented()).unwrap();
    let (mut decoded, mut restored) = (0, 0);
    for i in 0..iters {
        let mut edited = body.to_vec();
        for _ in 0..rng.usize(1..=4) {
            let region = if rng.bool() { tables.clone() } else { frames.clone() };
            let at = rng.usize(region);
            edited[at] = match rng.u8(..4) {
                0 => 0,
                1 => 0xff,
                2 => edited[at] ^ (1 << rng.u8(..8)),
                _ => rng.u8(..),
            };
        }
        let sealed = seal(edited);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let Ok(s) = Snapshot::decode(&sealed) else { return (false, false) };
            (true, Guest::restore(&engine, &module, GuestConfig::new(vec![]), &s).is_ok())
        }));
        let (d, r) = outcome.unwrap_or_else(|_| panic!("edit {i} panicked; replay with UPSTARE_FUZZ_SEED={seed}"));
        decoded += u64::from(d);
        restored += u64::from(r);
    }
    eprintln!("snapshot fuzz: seed {seed}, {iters} edits, {decoded} decoded, {restored} restored");
    assert!(decoded > 0 && decoded < iters, "the edits reach past the decoder and are refused by it: {decoded} of {iters}");
}
