//! Checkpoint and restore through the real binaries: a host serving its
//! control socket, `upstare-host status` and `checkpoint` talking to it, the
//! host killed, and `upstare-host restore` finishing the program with the
//! output an uninterrupted run gives. Bad requests get errors and leave the
//! program running; bad snapshot files are refused.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use upstare_tests::{guest, host_command, run_host, KillOnDrop, TempDir};

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
    let mut server = KillOnDrop::spawn(
        host_command()
            .args(["--control", sock, compute])
            .args(ARGS)
            .stdout(std::fs::File::create(&first_out).unwrap())
            .stderr(Stdio::null()),
    );
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
    assert!(server.0.try_wait().unwrap().is_none(), "the program survives a failed checkpoint");

    let snap = dir.0.join("compute.snap");
    let cp = host(&["checkpoint", "--control", sock, snap.to_str().unwrap()]);
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    assert!(String::from_utf8_lossy(&cp.stdout).contains("paused"), "{cp:?}");
    // Both checkpoints paused the program, the failed one too.
    let status = host(&["status", "--control", sock]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("pauses: 2"), "{status:?}");
    assert!(server.0.try_wait().unwrap().is_none(), "the program goes on after a checkpoint");
    drop(server);

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

/// The KV server checkpointed while a client keeps it busy, killed, and
/// restored on another port: every key written before the checkpoint is
/// there, and the server serves new clients.
#[test]
fn kv_server_checkpointed_under_load_keeps_every_key() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use upstare_tests::{Client, Server};

    let dir = TempDir::new("kv-checkpoint");
    let sock = dir.0.join("control.sock");
    let sock = sock.to_str().unwrap();
    let (mut server, first) = Server::start(&guest("kv-server"), &["--control", sock], &[]);
    assert!(first.starts_with("kv: listening"), "{first}");
    let mut writer = server.client();
    for i in 0..300 {
        assert_eq!(writer.request(&format!("SET key{i} value-{i}")), "OK");
    }

    // Load: another client keeps writing and reading during the checkpoint.
    let stop = Arc::new(AtomicBool::new(false));
    let port = server.port;
    let load = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut c = Client::connect(port);
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                assert_eq!(c.request(&format!("SET load{} {n}", n % 50)), "OK");
                assert_eq!(c.request(&format!("GET load{}", n % 50)), format!("VALUE {n}"));
                n += 1;
            }
            n
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.0.join("kv.snap");
    let cp = host(&["checkpoint", "--control", sock, snap.to_str().unwrap()]);
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    assert!(load.join().unwrap() > 10, "the load ran through the checkpoint");
    drop(writer);
    server.kill();

    let restored = Server::spawn(host_command().args(["restore", "--tcplisten", "127.0.0.1:0", snap.to_str().unwrap()]));
    let mut client = restored.client();
    for i in 0..300 {
        assert_eq!(client.request(&format!("GET key{i}")), format!("VALUE value-{i}"));
    }
    assert_eq!(client.request("SET after restore"), "OK");
    assert_eq!(client.request("GET after"), "VALUE restore");
}

/// A program checkpointed while it holds a file open part-way through, and
/// an append-only log: restored, it reads on from the same offset and
/// appends to the same log.
#[test]
fn open_files_are_reopened_at_their_offsets() {
    let dir = TempDir::new("files-checkpoint");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("input.txt"), "0123456789abcdefghij\n").unwrap();
    let sock = dir.0.join("control.sock");
    let sock = sock.to_str().unwrap();
    let spec = format!("{}::/data", data.display());
    let reader = guest("reader");
    let mut server = KillOnDrop::spawn(
        host_command()
            .args(["--control", sock, "--dir", &spec, reader.to_str().unwrap(), "/data"])
            .stdout(Stdio::piped()),
    );
    let mut out = std::io::BufReader::new(server.0.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert_eq!(first, "first: 0123456789\n");
    // Let it reach its wait: a checkpoint taken before its write to the log
    // would, restored, make that write again (files are reopened, not
    // copied, and the checkpointed process went on running).
    std::thread::sleep(Duration::from_millis(300));
    let snap = dir.0.join("reader.snap");
    let cp = host(&["checkpoint", "--control", sock, snap.to_str().unwrap()]);
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    drop(server);

    let restored = host_command().args(["restore", snap.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(data.join("go"), "").unwrap();
    let done = restored.wait_with_output().unwrap();
    assert!(done.status.success());
    assert_eq!(String::from_utf8_lossy(&done.stdout), "rest: abcdefghij\n\n");
    assert_eq!(std::fs::read_to_string(data.join("log.txt")).unwrap(), "before\nafter\n");
}

/// A guest that cannot reach an update point within the limit: the update
/// and the checkpoint are refused with the reason, and the program runs on
/// and finishes.
///
/// What keeps it from an update point is one host call that cannot be
/// interrupted: `random_get` filling a buffer, which the `busy` guest sizes
/// to take about two seconds on this machine (it measures the host first),
/// and makes once for each request. It waits for nothing outside the host,
/// so it is no update point, and the host does not give up a call half
/// done. Blocking calls cannot stand in here: every one of them, opening a
/// FIFO included, waits where the host can interrupt it.
#[test]
fn a_pause_that_cannot_happen_in_time_is_refused_and_the_program_runs_on() {
    use std::io::BufRead;

    let dir = TempDir::new("pause-limit");
    let sock = dir.0.join("control.sock");
    let sock = sock.to_str().unwrap();
    let mut server = KillOnDrop::spawn(
        host_command()
            .args(["--control", sock, "--pause-limit", "200", guest("busy").to_str().unwrap(), "2"])
            .stdout(Stdio::piped()),
    );
    let mut lines = std::io::BufReader::new(server.0.stdout.take().unwrap()).lines();
    let mut next_line = || lines.next().expect("the guest prints a line").unwrap();
    wait_for(Path::new(sock));

    // The update goes first, in the longer call (its pages are new): it
    // prepares the new version before it asks for the pause.
    assert_eq!(next_line(), "busy 1");
    let update = host(&["update", "--control", sock, guest("busy").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&update.stderr);
    assert_eq!(update.status.code(), Some(1), "{err}");
    assert!(
        err.contains("update refused: the guest did not reach an update point within 200 ms (--pause-limit); the old version runs on"),
        "{err}"
    );
    assert!(server.0.try_wait().unwrap().is_none(), "the program runs on");

    // A checkpoint waits for the same pause, and is refused the same way.
    assert_eq!(next_line(), "busy 2");
    let snap = dir.0.join("never.snap");
    let out = host(&["checkpoint", "--control", sock, snap.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not reach an update point within 200 ms"), "{err}");
    assert!(!snap.exists());
    assert!(server.0.try_wait().unwrap().is_none(), "the program runs on");
    assert_eq!(next_line(), "done");
    assert!(server.0.wait().unwrap().success());
}

/// A program checkpointed after a live update resumes as the new version,
/// with its state; it cannot be updated again (the snapshot does not record
/// the layout the update gave it), and says so.
#[test]
fn a_checkpoint_after_an_update_resumes_the_new_version_and_refuses_further_updates() {
    use upstare_tests::{expect_error, expect_report, missing_keys, Control, Server};

    let control = Control::new("update-checkpoint");
    let (mut server, first) = Server::start(&guest("kv-server"), &["--control", &control.path()], &[]);
    assert_eq!(first.trim(), "kv: listening on fd 3");
    let mut client = server.client();
    let keys: Vec<(String, String)> = (0..50).map(|i| (format!("key{i}"), format!("value-{i}"))).collect();
    for (k, v) in &keys {
        assert_eq!(client.request(&format!("SET {k} {v}")), "OK");
    }
    expect_report(&control.update(&guest("kv-server-v2")));
    let stats = client.request("STATS");
    assert!(stats.starts_with("STATS requests=1 keys=50 "), "{stats}");
    let snapshot = control.checkpoint("after-update");
    drop(client);
    server.kill();

    let restored_control = Control::new("update-restored");
    let path = restored_control.dir().join("after-update.snap");
    std::fs::write(&path, snapshot.encode()).unwrap();
    let restored = Server::spawn(host_command().args([
        "restore",
        "--control",
        &restored_control.path(),
        "--tcplisten",
        "127.0.0.1:0",
        path.to_str().unwrap(),
    ]));
    let port = restored.port;
    let mut client = restored.client();
    // v2's counter, carried through the snapshot: two STATS so far.
    let stats = client.request("STATS");
    assert!(stats.starts_with("STATS requests=2 keys=50 "), "v2 resumed with its counts: {stats}");
    assert!(missing_keys(port, &keys).is_empty());

    let reason = expect_error(&restored_control.update(&guest("kv-server-v3")), 1);
    assert!(
        reason.starts_with("update refused: this program was restored from a snapshot taken after a live update"),
        "{reason}"
    );
    assert_eq!(client.request("GET key7"), "VALUE value-7", "the restored program serves on");
}
