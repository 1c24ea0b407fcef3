//! Frames rebuilt where they stand: a blocking server
//! (`guest-examples/recv-server`: accept, then a loop of `recv()` on one
//! connection) whose serving loop changes before `recv()` and whose frame in
//! linear memory grows is updated while a client is in the middle of a
//! line. The serving loop counts its reads in a global before each call, so
//! it cannot go back to its loop header: its frame is rebuilt at the call,
//! the partial line moved to the buffer's new place, and the frames of
//! `recv()` above it shifted with their addresses rewritten.

use std::time::Duration;

use upstare_tests::{expect_error, expect_report, guest, Client, ClientThreads, Control, Server};

/// A recv-server of the given version with a control socket.
fn start(version: &str, tag: &str) -> (Server, Control) {
    let control = Control::new(tag);
    let (server, first) = Server::start(&guest(version), &["--control", &control.path()], &[]);
    assert!(first.starts_with("recv-server v"), "{version} starts: {first:?}");
    (server, control)
}

/// Clients that each connect, send `INCR`, then what `then` sends and
/// checks, and close, over and over: the server serves one connection at a
/// time, so the others wait in the listen backlog meanwhile. Each checks
/// that the shared counter only goes up.
pub(crate) fn visitors(port: u16, clients: usize, then: fn(&mut Client) -> Result<(), String>) -> ClientThreads {
    ClientThreads::start(clients, move || {
        let mut last = 0u64;
        move || {
            let mut client = Client::connect(port);
            let count = client.try_request("INCR");
            let n = count.as_deref().ok().and_then(|r| r.strip_prefix("COUNT ")).and_then(|n| n.parse::<u64>().ok());
            match (n, then(&mut client)) {
                (Some(n), Ok(())) if n > last => {
                    last = n;
                    Ok(())
                }
                (_, then) => Err(format!("INCR -> {count:?}, then {then:?}, after COUNT {last}")),
            }
        }
    })
}

/// `PING`, answered by either version.
fn ping(client: &mut Client) -> Result<(), String> {
    match client.try_request("PING") {
        Ok(pong) if pong == "PONG v1" || pong == "PONG v2" => Ok(()),
        other => Err(format!("PING -> {other:?}")),
    }
}

#[test]
fn a_serving_loop_whose_frame_grew_is_rebuilt_at_recv_with_its_partial_line_under_load() {
    let (server, control) = start("recv-server", "rebuild-recv");
    // The connection being served: half a line waits in the serving loop's
    // buffer while it stands in recv().
    let mut served = server.client();
    assert_eq!(served.request("PING"), "PONG v1");
    served.send_raw("ECHO hel");
    // More clients queue behind it.
    let visitors = visitors(server.port, 3, ping);
    std::thread::sleep(Duration::from_millis(200));

    let report = expect_report(&control.update(&guest("recv-server-v2")));
    assert_eq!(report.count("frames", "rebuilt"), 1, "the serving loop's frame was rebuilt where it stands");
    assert_eq!(report.count("frames", "retreated"), 0);
    // The line finishes in the new version, its first half intact; the new
    // code before recv() counted the next line begun.
    served.send_raw("lo world\n");
    assert_eq!(served.read_line(), "ECHO[11] hello world", "the half line sent under v1 was kept and v2 answered it");
    assert_eq!(served.request("LINES"), "LINES 1", "v2's loop counted the line begun after the update");
    assert_eq!(served.request("PING"), "PONG v2");
    drop(served);
    visitors.wait_for(30);

    // Under load, back and forth: each update finds the serving loop in
    // recv() on a visitor's connection (rebuilt: it shrinks, then grows),
    // or main in accept().
    for version in ["recv-server", "recv-server-v2", "recv-server", "recv-server-v2"] {
        expect_report(&control.update(&guest(version)));
        visitors.wait_for(20);
    }
    let (visits, failures) = visitors.stop();
    assert!(failures.is_empty(), "{failures:?}");
    let mut last = server.client();
    assert_eq!(last.request("INCR"), format!("COUNT {}", visits + 1), "no INCR lost or doubled");
    assert_eq!(last.request("PING"), "PONG v2");
}

#[test]
fn a_pointer_to_the_line_buffer_in_a_global_keeps_the_frame_from_being_rebuilt() {
    let (server, control) = start("recv-server-pinned", "rebuild-pinned");
    let mut served = server.client();
    assert_eq!(served.request("PING"), "PONG v1");
    served.send_raw("ECHO hel");
    std::thread::sleep(Duration::from_millis(100));

    let refused = expect_error(&control.update(&guest("recv-server-pinned-v2")), 1);
    assert!(refused.contains("global `line_in_progress` holds the address of the stack of `serve`"), "{refused}");
    // v1 serves on, the half line intact.
    served.send_raw("lo world\n");
    assert_eq!(served.read_line(), "hello world");
    assert_eq!(served.request("PING"), "PONG v1");
}
