//! Frames that go back to their loop header: a poll-loop server whose every
//! version changes its main loop before `poll()` (`guest-examples/poll-server`:
//! a timeout and a new branch, a new local, the body reordered, a new call)
//! is updated along its version chain while clients keep talking to it.
//! main waits in poll() for as long as the server runs, and its frame cannot
//! move where it stands (the compiler lays the frame out anew); it moves back
//! to its loop header, and the new version's loop calls poll() itself.

use std::time::Duration;

use upstare_tests::{expect_error, expect_report, guest, Client, ClientThreads, Control, Server};

/// A poll-server of the given version with a control socket.
fn start(version: &str, tag: &str) -> (Server, Control) {
    let control = Control::new(tag);
    let (server, first) = Server::start(&guest(version), &["--control", &control.path()], &[]);
    assert!(first.starts_with("poll-server v"), "{version} starts: {first:?}");
    (server, control)
}

/// Clients that send `INCR` in a loop until stopped, each on its own
/// connection, checking that the shared counter only goes up.
fn incrementers(port: u16, clients: usize) -> ClientThreads {
    ClientThreads::start(clients, || {
        let mut client = Client::connect(port);
        let mut last = 0u64;
        move || {
            let reply = client.try_request("INCR");
            match reply.as_deref().ok().and_then(|r| r.strip_prefix("COUNT ")).and_then(|n| n.parse::<u64>().ok()) {
                Some(n) if n > last => {
                    last = n;
                    Ok(())
                }
                _ => Err(format!("INCR -> {reply:?} after COUNT {last}")),
            }
        }
    })
}

#[test]
fn a_main_loop_changed_before_poll_is_updated_at_its_header_under_load() {
    let (server, control) = start("poll-server", "retreat-chain");
    // A line in flight across both updates: its first half is in the
    // server's buffer when the loop goes back to its header.
    let mut partial = server.client();
    partial.send_raw("PI");
    let mut first = server.client();
    assert_eq!(first.request("INCR"), "COUNT 1");

    // Idle, main waits in poll(): it goes back to its loop header.
    let report = expect_report(&control.update(&guest("poll-server-v2")));
    assert_eq!(report.count("frames", "retreated"), 1, "main went back to its loop header");
    assert!(report.count("frames", "dropped") >= 1, "poll()'s frames were dropped");
    let load = incrementers(server.port, 3);
    load.wait_for(50);
    // The new loop runs at once: poll() times out and counts idle ticks.
    let mut fresh = server.client();
    assert_eq!(fresh.request("PING"), "PONG v2");
    std::thread::sleep(Duration::from_millis(100));
    let ticks = fresh.request("TICKS");
    assert!(ticks.starts_with("TICKS "), "{ticks}");

    // Busy, the update pauses main in poll() (and it goes back to its loop
    // header) or at another loop header of main (and it is rebuilt there).
    expect_report(&control.update(&guest("poll-server-v3")));
    load.wait_for(50);
    let wakeups = fresh.request("WAKEUPS");
    let n: u64 = wakeups.strip_prefix("WAKEUPS ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{wakeups}"));
    assert!(n > 0, "v3 counts poll()'s returns from its first iteration: {wakeups}");

    // v4 reorders the loop body: connections are accepted before the
    // others are served, and counted. The code that moved pairs piece by
    // piece, so main's temporaries (the count of entries in use) keep
    // their values.
    expect_report(&control.update(&guest("poll-server-v4")));
    load.wait_for(50);
    let mut newcomer = server.client();
    assert_eq!(newcomer.request("PING"), "PONG v4");
    let accepts = newcomer.request("ACCEPTS");
    let n: u64 = accepts.strip_prefix("ACCEPTS ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{accepts}"));
    assert!(n >= 1, "v4 counted the newcomer's connection: {accepts}");
    assert_eq!(fresh.request("PING"), "PONG v4", "the connections of v3 are served on");

    // v5 makes a new call before poll(): census() counts the connections
    // open each time round.
    expect_report(&control.update(&guest("poll-server-v5")));
    load.wait_for(50);
    assert_eq!(newcomer.request("PING"), "PONG v5");
    // partial, first, fresh, newcomer and the three incrementers.
    assert_eq!(newcomer.request("CONNS"), "CONNS 7", "census() ran before the poll() that brought CONNS");

    partial.send_raw("NG\n");
    assert_eq!(partial.read_line(), "PONG v5", "the half line sent under v1 was kept");
    let (sent, failures) = load.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(fresh.request("INCR"), format!("COUNT {}", sent + 2), "no INCR lost or doubled");
}

/// v7 computes the count of entries in use anew before poll(), in code v4
/// does not have: the value main's frame holds is not the one the new code
/// would, neither where it stands nor at its loop header, so the update is
/// refused naming that temporary, and v4 serves on, under load.
#[test]
fn a_temporary_the_new_loop_computes_otherwise_is_refused_naming_it() {
    let (server, control) = start("poll-server-v4", "retreat-trim");
    let mut client = server.client();
    assert_eq!(client.request("PING"), "PONG v4");
    // Idle, main waits in poll() at every attempt, so the reason given is
    // the one for that point (busy, the last attempt may find main at any
    // of its points, where the same temporary refuses in other words).
    let (out, _) = control.update_with_timeout(&guest("poll-server-trim"), 300);
    let reason = expect_error(&out, 1);
    assert!(reason.starts_with("update refused: __original_main was still on the stack"), "{reason}");
    assert!(
        reason.contains("at call to poll #0: local ")
            && reason.contains("it cannot go back to its loop header: local ")
            && reason.contains(
                "(a compiler temporary) is live at the new loop header and has no counterpart in the old frame: the new version computes it otherwise than the old one computed local "
            ),
        "{reason}"
    );
    let load = incrementers(server.port, 2);
    load.wait_for(50);
    let (sent, failures) = load.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(client.request("PING"), "PONG v4", "the old version serves on");
    assert_eq!(client.request("INCR"), format!("COUNT {}", sent + 1));
}

#[test]
fn a_global_written_before_poll_keeps_the_frame_from_going_back() {
    let (server, control) = start("poll-server-effect", "retreat-effect");
    let mut client = server.client();
    assert_eq!(client.request("PING"), "PONG v6");
    let (out, _) = control.update_with_timeout(&guest("poll-server-v2"), 300);
    let reason = expect_error(&out, 1);
    assert!(reason.starts_with("update refused: "), "{reason}");
    assert!(
        reason.contains("it cannot go back to its loop header: between its loop header and the call it stores to the global variable `loops`"),
        "{reason}"
    );
    assert_eq!(client.request("PING"), "PONG v6", "the old version serves on");
    assert_eq!(client.request("INCR"), "COUNT 1");
}

/// The sum `spin` prints for `n`: step(i) = 3i + i/128 over i < n, wrapping
/// at 64 bits as C's unsigned long long does.
fn spin_sum(n: u64) -> u64 {
    let n = u128::from(n);
    let (full, rest) = (n / 128, n % 128);
    let shifted = 128 * full * full.saturating_sub(1) / 2 + full * rest;
    (3 * n * n.saturating_sub(1) / 2 + shifted) as u64
}

/// A CPU-bound loop whose body changed: updated where it runs, the new
/// body takes over the loop and the result is the one an uninterrupted run
/// prints.
#[test]
fn a_cpu_bound_loop_whose_body_changed_is_updated_where_it_runs() {
    const N: u64 = 1_500_000_000;
    let control = Control::new("retreat-spin");
    let running = upstare_tests::host_command()
        .args(["--control", &control.path()])
        .arg(guest("spin"))
        .arg(N.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("upstare-host starts");
    upstare_tests::wait_for_path(std::path::Path::new(&control.path()));
    std::thread::sleep(Duration::from_millis(200));
    let report = expect_report(&control.update(&guest("spin-v2")));
    assert_eq!(report.count("frames", "retreated"), 0, "main was rebuilt where it stood, at its loop header");
    let out = running.wait_with_output().expect("the program ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some(format!("sum {}", spin_sum(N)).as_str()), "{stdout}");
    let laps: u64 = lines.next().and_then(|l| l.strip_prefix("laps ")).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{stdout}"));
    assert!(laps > 0 && laps <= N >> 20, "the new body counted laps: {stdout}");
}
