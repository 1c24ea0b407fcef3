//! Every WASI call that can block is interrupted from another thread and
//! ends with the host's own outcome (not an errno the guest sees): a trap-like
//! `Exit::Interrupted` for a module run without instrumentation, a pause at
//! that call for an instrumented one, which then resumes into the same call.
//! Each guest here is a few lines of WAT that blocks in one call; the host is
//! the real library with a real listener, client and pipe.

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, LoadOptions, Stdio};
use upstare_instrument::abi::ResumeKind;

const AS_IS: LoadOptions = LoadOptions { instrument: false, stress: false, cache_dir: None, lazy_rewind: false };

/// Memory layout shared by the guests: an iovec at 0 (64 KiB buffer at
/// 1024), a subscription at 128, events at 256, results at 512.
const PRELUDE: &str = r#"
  (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_send" (func $send (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "\00\04\00\00\00\00\01\00")
  (func $accepted (result i32)
    (drop (call $accept (i32.const 3) (i32.const 0) (i32.const 512)))
    (i32.load (i32.const 512)))
"#;

struct Blocked {
    call: &'static str,
    body: &'static str,
    /// Installs a listener at fd 3.
    listener: bool,
    /// Connects a client that never sends nor reads.
    client: bool,
}

const CASES: &[Blocked] = &[
    Blocked {
        call: "sock_accept",
        body: "(drop (call $accept (i32.const 3) (i32.const 0) (i32.const 512)))",
        listener: true,
        client: false,
    },
    Blocked {
        call: "sock_recv",
        body: "(drop (call $recv (call $accepted) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 516) (i32.const 520)))",
        listener: true,
        client: true,
    },
    Blocked {
        call: "fd_read",
        body: "(drop (call $read (call $accepted) (i32.const 0) (i32.const 1) (i32.const 516)))",
        listener: true,
        client: true,
    },
    Blocked {
        call: "fd_read",
        body: "(drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 516)))",
        listener: false,
        client: false,
    },
    Blocked {
        // A client that never reads: the send buffer fills, then send blocks.
        call: "sock_send",
        body: "(local $fd i32) (local.set $fd (call $accepted))
               (loop $again (drop (call $send (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 516))) (br $again))",
        listener: true,
        client: true,
    },
    Blocked {
        // stdout is a pipe nobody reads: once it is full, writing blocks.
        call: "fd_write",
        body: "(loop $again (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 516))) (br $again))",
        listener: false,
        client: false,
    },
    Blocked {
        call: "fd_write",
        body: "(local $fd i32) (local.set $fd (call $accepted))
               (loop $again (drop (call $write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 516))) (br $again))",
        listener: true,
        client: true,
    },
    Blocked {
        // Waiting for a connection through poll_oneoff (FD_READ on fd 3).
        call: "poll_oneoff",
        body: "(i32.store8 (i32.const 136) (i32.const 1)) (i32.store (i32.const 144) (i32.const 3))
               (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 516)))",
        listener: true,
        client: false,
    },
    Blocked {
        // Sleeping: one monotonic clock subscription of an hour.
        call: "poll_oneoff",
        body: "(i32.store8 (i32.const 136) (i32.const 0)) (i32.store (i32.const 144) (i32.const 1))
               (i64.store (i32.const 152) (i64.const 3600000000000))
               (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 516)))",
        listener: false,
        client: false,
    },
];

/// Runs one case without instrumentation: starts the guest, lets it block,
/// interrupts it, and returns how it ended and how long the interruption
/// took.
/// A case's guest, loaded as `options` say, and its configuration: the
/// listener's port, and the write end of its stdin pipe, which nobody
/// writes to but which stays open so the guest sees no end of file.
struct Setup {
    engine: upstare_host::Engine,
    module: GuestModule,
    config: GuestConfig,
    port: u16,
    stdin_write: std::io::PipeWriter,
    /// The read end of stdout, open and never read.
    _stdout_read: std::io::PipeReader,
}

fn setup(case: &Blocked, options: &LoadOptions) -> Setup {
    let wat = format!("(module {PRELUDE} (func (export \"_start\") {}))", case.body);
    let wasm = wat::parse_str(&wat).expect("test guest assembles");
    let engine = new_engine().unwrap();
    let module = GuestModule::from_bytes_with(&engine, "blocker.wasm".as_ref(), &wasm, options).unwrap();
    let mut config = GuestConfig::new(vec!["blocker".into()]);
    let mut port = 0;
    if case.listener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        port = listener.local_addr().unwrap().port();
        config.listeners.push(listener);
    }
    let (stdin_read, stdin_write) = std::io::pipe().unwrap();
    config.stdin = Stdio::Fd(OwnedFd::from(stdin_read));
    let (stdout_read, stdout_write) = std::io::pipe().unwrap();
    config.stdout = Stdio::Fd(OwnedFd::from(stdout_write));
    Setup { engine, module, config, port, stdin_write, _stdout_read: stdout_read }
}

fn interrupt_case(case: &Blocked) -> (Exit, Duration) {
    let Setup { engine, module, config, port, stdin_write, _stdout_read } = setup(case, &AS_IS);

    let (tx, rx) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut guest = Guest::new(&engine, &module, config).unwrap();
        tx.send(guest.interrupt_handle()).unwrap();
        let exit = guest.run();
        (exit, Instant::now())
    });
    let handle = rx.recv().unwrap();
    let _client = case.client.then(|| TcpStream::connect(("127.0.0.1", port)).unwrap());
    // Long enough for the guest to reach its blocking call (and for a
    // sender to fill the socket buffers).
    std::thread::sleep(Duration::from_millis(300));
    assert!(!runner.is_finished(), "{}: the guest should be blocked", case.call);
    let asked = Instant::now();
    handle.interrupt();
    let (exit, ended) = runner.join().unwrap();
    drop(stdin_write);
    (exit, ended.duration_since(asked))
}

#[test]
fn every_blocking_call_is_interruptible() {
    for case in CASES {
        let (exit, latency) = interrupt_case(case);
        match exit {
            Exit::Interrupted { call } => assert_eq!(call, case.call),
            other => panic!("{}: expected an interruption, got {other:?}", case.call),
        }
        // The latency target (1 ms) is measured by the bench; this bound
        // only shows the call did not wait for data or a timeout.
        assert!(latency < Duration::from_secs(1), "{}: took {latency:?}", case.call);
    }
}

#[test]
fn a_request_made_before_blocking_is_not_lost() {
    let wat = format!("(module {PRELUDE} (func (export \"_start\") {}))", CASES[0].body);
    let wasm = wat::parse_str(&wat).unwrap();
    let engine = new_engine().unwrap();
    let module = GuestModule::from_bytes_with(&engine, "early.wasm".as_ref(), &wasm, &AS_IS).unwrap();
    let mut config = GuestConfig::new(vec!["early".into()]);
    config.listeners.push(TcpListener::bind("127.0.0.1:0").unwrap());
    let mut guest = Guest::new(&engine, &module, config).unwrap();
    guest.interrupt_handle().interrupt();
    assert!(matches!(guest.run(), Exit::Interrupted { call: "sock_accept" }));
}

#[test]
fn an_interrupted_call_leaves_no_request_behind() {
    // After one interruption, a blocking call with data ready completes.
    let wat = format!(
        "(module {PRELUDE} (func (export \"_start\") (local $fd i32)
            (local.set $fd (call $accepted))
            (drop (call $recv (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 516) (i32.const 520)))))"
    );
    let wasm = wat::parse_str(&wat).unwrap();
    let engine = new_engine().unwrap();
    let module = GuestModule::from_bytes_with(&engine, "once.wasm".as_ref(), &wasm, &AS_IS).unwrap();
    let mut config = GuestConfig::new(vec!["once".into()]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    config.listeners.push(listener);
    let mut guest = Guest::new(&engine, &module, config).unwrap();
    let handle = guest.interrupt_handle();
    handle.interrupt();
    assert!(guest.wasi().interrupter().take_pending(), "the request is pending");
    assert!(!guest.wasi().interrupter().take_pending(), "and taken only once");
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut client, b"data").unwrap();
    assert!(matches!(guest.run(), Exit::Status(0)));
}

/// An instrumented guest blocked in each call pauses there when asked, with
/// the blocking call as its innermost resume point; resumed, it makes the
/// call again and blocks, and pauses again on a second request.
#[test]
fn every_blocking_call_pauses_an_instrumented_guest() {
    for case in CASES {
        let Setup { engine, module, config, port, stdin_write, _stdout_read } = setup(case, &upstare_tests::instrumented());
        assert!(module.is_instrumented());
        let meta = module.metadata().unwrap().clone();

        let (handle_tx, handle_rx) = mpsc::channel();
        let (paused_tx, paused_rx) = mpsc::channel();
        let runner = std::thread::spawn(move || {
            let mut guest = Guest::new(&engine, &module, config).unwrap();
            handle_tx.send(guest.pause_handle().unwrap()).unwrap();
            let mut exits = Vec::new();
            for _ in 0..2 {
                let exit = guest.run();
                let frames = guest.frames().map(|f| f.to_vec()).unwrap_or_default();
                paused_tx.send(Instant::now()).unwrap();
                exits.push((exit, frames));
            }
            exits
        });
        let pause = handle_rx.recv().unwrap();
        let _client = case.client.then(|| TcpStream::connect(("127.0.0.1", port)).unwrap());
        for round in 0..2 {
            std::thread::sleep(Duration::from_millis(300));
            assert!(!runner.is_finished(), "{} round {round}: the guest should be blocked", case.call);
            let asked = pause.request();
            let paused = paused_rx.recv_timeout(Duration::from_secs(5)).expect("the guest pauses");
            assert!(paused.duration_since(asked) < Duration::from_secs(1), "{}: slow pause", case.call);
        }
        let exits = runner.join().unwrap();
        drop(stdin_write);
        for (exit, frames) in exits {
            assert!(matches!(exit, Exit::Paused), "{}: expected a pause, got {exit:?}", case.call);
            let inner = frames.first().expect("a paused guest has frames");
            let rp = &meta.function(inner.func).unwrap().resume_points[inner.resume_point as usize];
            assert_eq!(rp.kind, ResumeKind::BlockingCall, "{}: paused at {rp:?}", case.call);
        }
    }
}

/// A request to pause at a blocking call only stops a guest that spends
/// most of its time computing at its next blocking call, not at the loop
/// header where a plain request would mostly find it (the update's retry
/// after a frame that cannot move where it stands relies on it). Each
/// write is 64 KiB, which the host writes in pipe-sized pieces: a request
/// that arrives between two pieces makes a short write and must stay
/// pending for the next call.
#[test]
fn a_pause_at_a_blocking_call_waits_for_one() {
    // Forever: count to 200 000, then write the 64 KiB buffer to stdout.
    let wat = format!(
        "(module {PRELUDE} (func (export \"_start\") (local $i i32)
            (loop $forever
              (local.set $i (i32.const 0))
              (loop $spin
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $spin (i32.lt_u (local.get $i) (i32.const 200000))))
              (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 516)))
              (br $forever))))"
    );
    let wasm = wat::parse_str(&wat).unwrap();
    let engine = new_engine().unwrap();
    let module = GuestModule::from_bytes_with(&engine, "spinner.wasm".as_ref(), &wasm, &upstare_tests::instrumented()).unwrap();
    let meta = module.metadata().unwrap().clone();
    let mut config = GuestConfig::new(vec!["spinner".into()]);
    config.stdout = Stdio::Fd(OwnedFd::from(std::fs::File::create("/dev/null").unwrap()));
    const ROUNDS: usize = 5;
    let (handle_tx, handle_rx) = mpsc::channel();
    let (paused_tx, paused_rx) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut guest = Guest::new(&engine, &module, config).unwrap();
        handle_tx.send(guest.pause_handle().unwrap()).unwrap();
        for _ in 0..ROUNDS {
            let exit = guest.run();
            paused_tx.send((exit, guest.frames().map(|f| f.to_vec()).unwrap_or_default())).unwrap();
        }
    });
    let pause = handle_rx.recv().unwrap();
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(20));
        pause.request_at_blocking_call();
        let (exit, frames) = paused_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("round {round}: the guest never paused"));
        assert!(matches!(exit, Exit::Paused), "round {round}: {exit:?}");
        let inner = frames.first().expect("a paused guest has frames");
        let rp = &meta.function(inner.func).unwrap().resume_points[inner.resume_point as usize];
        assert_eq!(rp.kind, ResumeKind::BlockingCall, "round {round}: paused at {rp:?}");
    }
    runner.join().unwrap();
}
