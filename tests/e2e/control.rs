//! The control socket under clients that misbehave or arrive together: an
//! idle connection holds up no update, `status` answers while an update
//! waits, concurrent updates run one at a time, and malformed or oversized
//! requests get a clear refusal while the host serves on.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use upstare_tests::{expect_error, expect_report, guest, run_host, sha256_file, Control};

use crate::frames::{v9_sleeping, SLEEP_MS};
use crate::update::{seed, start_kv};

/// A raw connection to the control socket that has sent nothing yet.
fn connect(control: &Control) -> UnixStream {
    let conn = UnixStream::connect(control.path()).expect("connect to the control socket");
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    conn
}

/// Everything the host writes back before it closes the connection.
fn reply(mut conn: UnixStream) -> String {
    let mut text = String::new();
    conn.read_to_string(&mut text).expect("the host replies and closes");
    text
}

/// Runs `upstare-host ARGS` on a thread; the result must come within `limit`.
fn run_host_within(args: Vec<String>, limit: Duration) -> std::process::Output {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = tx.send(run_host(&args));
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("upstare-host did not answer within {limit:?}"))
}

#[test]
fn an_idle_control_client_holds_up_no_update() {
    let (server, control) = start_kv("kv-server", "control-idle");
    let seeded = seed(server.port, "idle", 20);
    let idle = connect(&control);
    let connected = Instant::now();

    let v2 = guest("kv-server-v2");
    let args = vec!["update".into(), "--control".into(), control.path(), v2.display().to_string()];
    let report = expect_report(&run_host_within(args, Duration::from_secs(30)));
    assert_eq!(report.sha256, sha256_file(&v2));
    assert!(connected.elapsed() < Duration::from_secs(5), "the update went through while the idle client was still connected");
    assert!(server.client().request("STATS").starts_with("STATS "), "v2 serves");
    assert!(upstare_tests::missing_keys(server.port, &seeded).is_empty());

    // The idle client is told why it is dropped, after the request deadline.
    let text = reply(idle);
    assert_eq!(text, "ERR no request line within 5 s; closing\n");
    assert!(connected.elapsed() >= Duration::from_secs(5), "dropped at the deadline, not before");
}

#[test]
fn status_answers_while_an_update_waits_and_a_second_update_waits_its_turn() {
    let (_server, control, mut sleeper, sent) = v9_sleeping("control-concurrent");
    let v9 = control.running_version();
    let v10 = guest("kv-server-v10");
    let update = |control: &Control| {
        let args = vec!["update".into(), "--control".into(), control.path(), "--timeout".into(), "20000".into()];
        let mut args: Vec<String> = args;
        args.push(v10.display().to_string());
        args
    };
    let first = {
        let args = update(&control);
        std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            (run_host(&a), Instant::now())
        })
    };
    // The first update now waits for the SLEEP to leave the stack; a second
    // one arrives behind it.
    std::thread::sleep(Duration::from_millis(300));
    let second = {
        let args = update(&control);
        std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            (run_host(&a), Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    let asked = Instant::now();
    assert_eq!(control.running_version(), v9, "status answers with the version still running");
    assert!(asked.elapsed() < Duration::from_millis(SLEEP_MS / 2), "status waited {:?} behind the update", asked.elapsed());
    assert!(sent.elapsed() < Duration::from_millis(SLEEP_MS), "status answered before the SLEEP ended");

    let (first, first_done) = first.join().unwrap();
    let (second, second_done) = second.join().unwrap();
    assert_eq!(expect_report(&first).sha256, sha256_file(&v10));
    assert!(first_done >= sent + Duration::from_millis(SLEEP_MS), "the first update waited for the SLEEP");
    // The second ran after the first, from v10 to v10: nothing changed.
    let again = expect_report(&second);
    assert!(second_done >= first_done, "the second update finished after the first");
    assert_eq!(again.count("functions", "changed"), 0, "{again:?}");
    assert_eq!(control.running_version(), sha256_file(&v10));
    assert_eq!(sleeper.read_line(), format!("SLEPT {SLEEP_MS}"));
    assert_eq!(sleeper.request("SLEEP 1"), "SLEPT 1 ms", "v10 serves");
}

#[test]
fn malformed_and_oversized_requests_are_refused_and_the_host_serves_on() {
    let (server, control) = start_kv("kv-server", "control-malformed");
    let cases: [(&[u8], &str); 4] = [
        (b"FROB\n", "ERR unknown request `FROB` (expected STATUS, CHECKPOINT <path>, UPDATE <ms> <path> or ROLLBACK <ms>)\n"),
        (b"UPDATE soon /x.wasm\n", "ERR UPDATE needs a timeout in milliseconds, not `soon`\n"),
        (b"STATUS \xff\n", "ERR request line is not UTF-8\n"),
        (b"\n", "ERR empty request (expected STATUS, CHECKPOINT <path>, UPDATE <ms> <path> or ROLLBACK <ms>)\n"),
    ];
    for (line, want) in cases {
        let mut conn = connect(&control);
        conn.write_all(line).unwrap();
        assert_eq!(reply(conn), want, "{}", String::from_utf8_lossy(line));
    }
    let mut long = connect(&control);
    // Sent without a newline: the host must stop reading at its limit.
    let _ = long.write_all(&vec![b'A'; 100 << 10]);
    assert_eq!(reply(long), "ERR request line longer than 65536 bytes\n");

    assert_eq!(server.client().request("SET still serving"), "OK");
    let out = run_host(&["status", "--control", &control.path()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn connections_beyond_the_limit_are_told_to_retry() {
    let (_server, control) = start_kv("kv-server", "control-limit");
    let idle: Vec<UnixStream> = (0..32).map(|_| connect(&control)).collect();
    // Every idle connection is being served (waiting for its line) before
    // the next arrives: status over the limit must be turned away.
    std::thread::sleep(Duration::from_millis(300));
    let out = run_host(&["status", "--control", &control.path()]);
    let reason = expect_error(&out, 1);
    assert_eq!(reason, "the host serves 32 control connections at once; try again");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let out = run_host(&["status", "--control", &control.path()]);
    assert!(out.status.success(), "status works again once they closed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The control socket is its owner's only: mode 0600.
#[test]
fn the_control_socket_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let (_server, control) = start_kv("kv-server", "control-mode");
    let mode = std::fs::metadata(control.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}
