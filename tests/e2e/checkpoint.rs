//! Checkpoint and restore through the real binaries: a host serving its
//! control socket, `upstare-host status` and `checkpoint` talking to it, the
//! host killed, and `upstare-host restore` finishing the program with the
//! output an uninterrupted run gives. Bad requests get errors and leave the
//! program running; bad snapshot files are refused.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use upstare_tests::{guest, host_bin, run_host, TempDir};

/// Long enough that a checkpoint lands mid-run.
const ARGS: [&str; 2] = ["5000", "2000"];

fn host(args: &[&str]) -> std::process::Output {
    run_host(args)
}

fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn checkpoint_kill_and_restore_gives_the_uninterrupted_output() {
    let dir = TempDir::new("checkpoint");
    let compute = guest("compute");
    let compute = compute.to_str().unwrap();
    let whole = host(&[&["--no-instrument", compute], &ARGS[..]].concat());
    assert!(whole.status.success());

    let sock = dir.0.join("control.sock");
    let sock = sock.to_str().unwrap();
    let first_out = dir.0.join("first.txt");
    let mut server = Command::new(host_bin())
        .args(["--control", sock, compute])
        .args(ARGS)
        .stdout(std::fs::File::create(&first_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Path::new(sock));
    std::thread::sleep(Duration::from_millis(300));

    let status = host(&["status", "--control", sock]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("instance 0: running"), "{text}");
    assert!(text.contains(compute), "{text}");

    // A bad request is refused and the program keeps running.
    let bad = host(&["checkpoint", "--control", sock, "/nonexistent-dir/snap"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("error: cannot write"), "{bad:?}");
    assert!(server.try_wait().unwrap().is_none(), "the program survives a failed checkpoint");

    let snap = dir.0.join("compute.snap");
    let cp = host(&["checkpoint", "--control", sock, snap.to_str().unwrap()]);
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    assert!(String::from_utf8_lossy(&cp.stdout).contains("paused"), "{cp:?}");
    // Both checkpoints paused the program, the failed one too.
    let status = host(&["status", "--control", sock]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("pauses: 2"), "{status:?}");
    assert!(server.try_wait().unwrap().is_none(), "the program goes on after a checkpoint");
    server.kill().unwrap();
    server.wait().unwrap();

    let rest = host(&["restore", snap.to_str().unwrap()]);
    assert!(rest.status.success(), "{}", String::from_utf8_lossy(&rest.stderr));
    let first = std::fs::read(&first_out).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&[first, rest.stdout].concat()),
        String::from_utf8_lossy(&whole.stdout),
        "output before the checkpoint plus output after the restore"
    );

    // Damaged and truncated files are refused with one line and status 2.
    let bytes = std::fs::read(&snap).unwrap();
    let bad_snap = dir.0.join("bad.snap");
    let mut damaged = bytes.clone();
    damaged[bytes.len() / 2] ^= 0x40;
    for (what, content) in [("damaged", damaged), ("truncated", bytes[..bytes.len() / 3].to_vec()), ("foreign", b"hello".to_vec())] {
        std::fs::write(&bad_snap, content).unwrap();
        let out = host(&["restore", bad_snap.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
    }
}

#[test]
fn control_commands_without_a_host_fail_clearly() {
    let dir = TempDir::new("no-host");
    let sock = dir.0.join("nobody.sock");
    for cmd in ["status", "checkpoint"] {
        let mut args = vec![cmd, "--control", sock.to_str().unwrap()];
        if cmd == "checkpoint" {
            args.push("x.snap");
        }
        let out = host(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.starts_with("error: cannot reach upstare-host"), "{cmd}: {err}");
    }
}
