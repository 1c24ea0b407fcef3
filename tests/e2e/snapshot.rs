//! Snapshots through the library: a guest paused mid-computation, captured,
//! written as bytes, and resumed in a new instance after the first one is
//! gone, finishes with exactly the output of an uninterrupted run; damaged,
//! truncated and foreign snapshots are refused.

use std::io::Read;
use std::time::Duration;

use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, Snapshot, SnapshotError, Stdio};
use upstare_tests::{guest, instrumented, TempDir};

const ARGS: [&str; 3] = ["compute", "400", "1500"];

fn config(stdout: &std::path::Path) -> GuestConfig {
    let mut config = GuestConfig::new(ARGS.iter().map(|s| s.to_string()).collect());
    config.stdout = Stdio::Fd(std::fs::File::create(stdout).unwrap().into());
    config
}

fn read(path: &std::path::Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path).unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Runs compute, pauses it after `after`, and returns its snapshot's bytes
/// and what it printed before; the instance is dropped.
pub(crate) fn checkpoint(after: Duration, dir: &TempDir) -> (Vec<u8>, String) {
    let engine = new_engine().unwrap();
    let module = GuestModule::load_with(&engine, &guest("compute"), &instrumented()).unwrap();
    let out = dir.0.join("first.txt");
    let mut g = Guest::new(&engine, &module, config(&out)).unwrap();
    let pause = g.pause_handle().unwrap();
    let runner = std::thread::Builder::new()
        .stack_size(upstare_host::GUEST_THREAD_STACK)
        .spawn(move || {
            let exit = g.run();
            assert!(matches!(exit, Exit::Paused), "expected a pause, got {exit:?}");
            assert!(g.frames().unwrap().len() > 1, "paused inside main, not at the top");
            g.snapshot().unwrap().encode()
        })
        .unwrap();
    std::thread::sleep(after);
    pause.request();
    let bytes = runner.join().unwrap();
    (bytes, read(&out))
}

#[test]
fn compute_resumed_from_a_snapshot_prints_what_an_uninterrupted_run_prints() {
    let dir = TempDir::new("snapshot");
    let engine = new_engine().unwrap();
    let module = GuestModule::load_with(&engine, &guest("compute"), &instrumented()).unwrap();
    let whole = dir.0.join("whole.txt");
    let exit = Guest::new(&engine, &module, config(&whole)).unwrap().run();
    assert!(matches!(exit, Exit::Status(0)), "{exit:?}");
    let expected = read(&whole);

    for after in [Duration::from_millis(30), Duration::from_millis(150)] {
        let (bytes, before) = checkpoint(after, &dir);
        let snapshot = Snapshot::decode(&bytes).unwrap();
        let out = dir.0.join("second.txt");
        let rest = std::thread::Builder::new()
            .stack_size(upstare_host::GUEST_THREAD_STACK)
            .spawn({
                let (engine, module, out) = (engine.clone(), module.clone(), out.clone());
                move || Guest::restore(&engine, &module, config(&out), &snapshot).unwrap().run()
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(matches!(rest, Exit::Status(0)), "{rest:?}");
        assert_eq!(format!("{before}{}", read(&out)), expected, "paused after {after:?}");
    }
}

#[test]
fn damaged_truncated_and_foreign_snapshots_are_refused() {
    let dir = TempDir::new("snapshot-bad");
    let (bytes, _) = checkpoint(Duration::from_millis(30), &dir);
    assert!(Snapshot::decode(&bytes).is_ok());

    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    assert!(matches!(Snapshot::decode(&flipped), Err(SnapshotError::Corrupt(_))));
    assert!(matches!(Snapshot::decode(&bytes[..bytes.len() - 40]), Err(SnapshotError::Corrupt(_))));
    assert!(matches!(Snapshot::decode(b"\0asm\x01\0\0\0"), Err(SnapshotError::NotASnapshot)));
    let mut future = bytes.clone();
    future[16] = 99;
    assert!(matches!(Snapshot::decode(&future), Err(SnapshotError::Version { found: 99 })));

    // A snapshot of compute cannot resume the files guest.
    let engine = new_engine().unwrap();
    let other = GuestModule::load_with(&engine, &guest("files"), &instrumented()).unwrap();
    let snapshot = Snapshot::decode(&bytes).unwrap();
    let err = Guest::restore(&engine, &other, GuestConfig::new(vec!["files".into()]), &snapshot).err().unwrap();
    assert!(matches!(err, SnapshotError::WrongModule { .. }), "{err}");
}
