//! The pause bound, measured on each batch guest: its instrumented variant
//! runs once to the end while another thread asks for a pause at random
//! moments, waits until the guest has unwound, and resumes it. What is
//! recorded is each request's time to paused (from
//! [`upstare_host::PauseHandle::request`] until `Guest::run` has returned
//! `Exit::Paused`, the stack unwound and its frames read); the worst of
//! them is the guest's longest stretch between update points, as this run
//! met it. The guest must print what the original printed: a differential
//! check of hundreds of unwinds and rewinds in the middle of real work.

use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use upstare_host::{Engine, Exit, Guest, GuestModule, GUEST_THREAD_STACK};

use crate::Batch;

/// The longest wait between one resume and the next request: pauses come
/// about twice a millisecond, so a run of a second meets a few thousand.
const MAX_GAP_US: u64 = 1_000;

/// Request-to-paused times of one run.
pub struct Pauses {
    pub count: usize,
    pub median: Duration,
    pub p99: Duration,
    pub worst: Duration,
}

enum Event {
    Paused(Instant),
    Ended(Exit),
}

/// Runs `module` (instrumented) under random pauses; `expected` is what
/// the original printed.
pub fn measure(engine: &Engine, module: &GuestModule, batch: &Batch, scratch: &Path, expected: &[u8]) -> Pauses {
    let out = scratch.with_extension("paused.stdout");
    let mut guest = Guest::new(engine, module, crate::config(batch, scratch, &out)).unwrap();
    let pause = guest.pause_handle().expect("an instrumented guest can pause");
    let (events, received) = channel();
    let (go, resumed) = channel::<()>();
    let runner = std::thread::Builder::new()
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || loop {
            match guest.run() {
                Exit::Paused => {
                    events.send(Event::Paused(Instant::now())).unwrap();
                    resumed.recv().unwrap();
                }
                exit => {
                    events.send(Event::Ended(exit)).unwrap();
                    return;
                }
            }
        })
        .unwrap();
    let mut times = Vec::new();
    let mut rng = 0x9e37_79b9_u64;
    let exit = loop {
        // xorshift: gaps that no loop of the guest can keep in step with.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if let Some(exit) = wait_for_end(&received, Duration::from_micros(rng % MAX_GAP_US)) {
            break exit;
        }
        let asked = pause.request();
        match received.recv().unwrap() {
            Event::Paused(at) => {
                times.push(at.duration_since(asked));
                go.send(()).unwrap();
                // Time the next request from a running guest, not from
                // one still rewinding.
                while !pause.frame_stack_empty() {
                    std::hint::spin_loop();
                }
            }
            // Finished before it reached an update point.
            Event::Ended(exit) => break exit,
        }
    };
    runner.join().unwrap();
    assert!(matches!(exit, Exit::Status(0)), "{} under pauses: {exit:?}", batch.guest.name);
    let printed = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(
        printed == expected,
        "{} under pauses prints something else than the original:\n{}\n---\n{}",
        batch.guest.name,
        String::from_utf8_lossy(&printed),
        String::from_utf8_lossy(expected)
    );
    assert!(!times.is_empty(), "{} ended before any pause was asked for", batch.guest.name);
    times.sort();
    Pauses { count: times.len(), median: times[times.len() / 2], p99: times[times.len() * 99 / 100], worst: *times.last().unwrap() }
}

/// Sleeps `gap`, unless the guest ends first.
fn wait_for_end(received: &Receiver<Event>, gap: Duration) -> Option<Exit> {
    match received.recv_timeout(gap) {
        Ok(Event::Ended(exit)) => Some(exit),
        Ok(Event::Paused(_)) => unreachable!("the guest paused with no request"),
        Err(_) => None,
    }
}
