//! A request handler changed while a request is inside it: the
//! recv-server's `DATA <n>` handler (`guest-examples/recv-server`) receives
//! its n bytes itself, one `recv()` after another. A client sends half a
//! request, the handler waits in `recv()` for the rest, and the update to a
//! version whose handler answers otherwise comes right then: the handler's
//! frame moves to the new code where it stands, with what it has summed so
//! far, and the request completes with the new version's answer. Other
//! clients queue behind it throughout (the server serves one connection at
//! a time) and are served once it is done.

use std::time::Duration;

use upstare_tests::{expect_report, guest, Client, Control, Server};

use crate::rebuild::visitors;

/// `DATA` in one piece (its payload `abc` and the line end the request
/// adds), then `PING`, answered by either version.
fn data_and_ping(client: &mut Client) -> Result<(), String> {
    let data = client.try_request("DATA 4\nabc");
    let ping = client.try_request("PING");
    match (data.as_deref(), ping.as_deref()) {
        (Ok("DATA 4 304" | "DATA 4 bytes, sum 304, v3"), Ok("PONG v1" | "PONG v3")) => Ok(()),
        _ => Err(format!("DATA -> {data:?}, PING -> {ping:?}")),
    }
}

#[test]
fn a_request_half_received_inside_a_changed_handler_completes_with_the_new_version() {
    let control = Control::new("handler-data");
    let (server, first) = Server::start(&guest("recv-server"), &["--control", &control.path()], &[]);
    assert!(first.starts_with("recv-server v1"), "{first:?}");
    let visitors = visitors(server.port, 3, data_and_ping);
    visitors.wait_for(20);

    // The connection being served: a DATA request of 10 bytes, 4 of them
    // sent. The handler has summed them and waits in recv() for the rest.
    let mut served = server.client();
    assert_eq!(served.request("DATA 3\nhi"), "DATA 3 219", "v1's answer (the payload ends with the line end)");
    served.send_raw("DATA 10\nabcd");
    std::thread::sleep(Duration::from_millis(200));

    let report = expect_report(&control.update(&guest("recv-server-v3")));
    assert!(report.count("frames", "mapped") >= 4, "the handler's frame and those below it moved where they stand");
    assert_eq!(report.count("frames", "retreated"), 0);
    served.send_raw("efghij");
    let sum: u32 = b"abcdefghij".iter().map(|&b| u32::from(b)).sum();
    assert_eq!(served.read_line(), format!("DATA 10 bytes, sum {sum}, v3"), "v3 answered the request begun under v1");
    assert_eq!(served.request("PING"), "PONG v3");
    drop(served);

    // The visitors queued behind it are served by v3.
    visitors.wait_for(20);
    let (visits, failures) = visitors.stop();
    assert!(failures.is_empty(), "{failures:?}");
    let mut last = server.client();
    assert_eq!(last.request("INCR"), format!("COUNT {}", visits + 1), "no INCR lost or doubled");
    assert_eq!(last.request("DATA 2\nx"), "DATA 2 bytes, sum 130, v3");
}
