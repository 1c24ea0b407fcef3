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

use upstare_tests::{expect_report, guest, Client, ClientThreads, Control, Server};

/// Clients that each connect, send `INCR`, `DATA` in one piece (its
/// payload `abc` and the line end the request adds) and `PING`, and close,
/// over and over, checking each answer against either version.
fn visitors(port: u16, clients: usize) -> ClientThreads {
    ClientThreads::start(clients, || {
        let mut last = 0u64;
        move || {
            let mut client = Client::connect(port);
            let count = client.try_request("INCR");
            let n = count.as_deref().ok().and_then(|r| r.strip_prefix("COUNT ")).and_then(|n| n.parse::<u64>().ok());
            let data = client.try_request("DATA 4\nabc");
            let ping = client.try_request("PING");
            match (n, data.as_deref(), ping.as_deref()) {
                (Some(n), Ok("DATA 4 304" | "DATA 4 bytes, sum 304, v3"), Ok("PONG v1" | "PONG v3")) if n > last => {
                    last = n;
                    Ok(())
                }
                _ => Err(format!("INCR -> {count:?}, DATA -> {data:?}, PING -> {ping:?} after COUNT {last}")),
            }
        }
    })
}

#[test]
fn a_request_half_received_inside_a_changed_handler_completes_with_the_new_version() {
    let control = Control::new("handler-data");
    let (server, first) = Server::start(&guest("recv-server"), &["--control", &control.path()], &[]);
    assert!(first.starts_with("recv-server v1"), "{first:?}");
    let visitors = visitors(server.port, 3);
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
