//! The poll()-driven key-value server under `upstare-host`, with real TCP
//! clients on loopback, several at once.

use std::io::Write;
use std::net::TcpStream;

use upstare_tests::{guest, Server};

fn start() -> Server {
    let (server, first) = Server::start(&guest("kv-server"), &[], &[]);
    assert_eq!(first.trim(), "kv: listening on fd 3", "the listener is guest fd 3");
    server
}

#[test]
fn serves_many_clients_at_once() {
    let mut server = start();
    let clients = 8;
    let keys = 150;
    std::thread::scope(|s| {
        for c in 0..clients {
            let mut client = server.client();
            s.spawn(move || {
                for k in 0..keys {
                    assert_eq!(client.request(&format!("SET c{c}-k{k} value {c} {k}")), "OK");
                }
                for k in 0..keys {
                    assert_eq!(client.request(&format!("GET c{c}-k{k}")), format!("VALUE value {c} {k}"));
                }
                for k in (0..keys).step_by(2) {
                    assert_eq!(client.request(&format!("DEL c{c}-k{k}")), "DELETED");
                }
                assert_eq!(client.request(&format!("GET c{c}-k0")), "NOT_FOUND");
            });
        }
    });
    let mut client = server.client();
    assert_eq!(client.request("COUNT"), format!("COUNT {}", clients * keys / 2));
    assert_eq!(client.request("FROB"), "ERROR unknown command");
    assert_eq!(client.request("SHUTDOWN"), "BYE");
    assert_eq!(server.wait(), Some(0));
}

#[test]
fn pipelined_and_split_requests() {
    let server = start();
    let mut client = server.client();
    // Three commands in one write, then one command split across writes.
    client.send("SET a 1\nSET b two words\nGET b");
    assert_eq!(client.read_line(), "OK");
    assert_eq!(client.read_line(), "OK");
    assert_eq!(client.read_line(), "VALUE two words");
    let mut raw = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    raw.write_all(b"GE").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    raw.write_all(b"T a\n").unwrap();
    let mut reply = [0u8; 8];
    std::io::Read::read_exact(&mut raw, &mut reply).unwrap();
    assert_eq!(&reply, b"VALUE 1\n");
}

#[test]
fn a_client_vanishing_does_not_disturb_others() {
    let server = start();
    let mut steady = server.client();
    assert_eq!(steady.request("SET k v"), "OK");
    for _ in 0..20 {
        let mut gone = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        gone.write_all(b"SET half").unwrap();
        drop(gone);
    }
    assert_eq!(steady.request("GET k"), "VALUE v");
    assert_eq!(steady.request("QUIT"), "BYE");
    let mut again = server.client();
    assert_eq!(again.request("COUNT"), "COUNT 1");
}
