//! The pause bound, measured on each batch guest: its instrumented variant
//! runs once to the end while another thread asks for a pause at random
//! moments ([`upstare_tests::random_pauses`]), waits until the guest has
//! unwound, and resumes it. What is
//! recorded is each request's time to paused (from
//! [`upstare_host::PauseHandle::request`] until `Guest::run` has returned
//! `Exit::Paused`, the stack unwound and its frames read); the worst of
//! them is the guest's longest stretch between update points, as this run
//! met it. The guest must print what the original printed: a differential
//! check of hundreds of unwinds and rewinds in the middle of real work.

use std::path::Path;
use std::time::Duration;

use upstare_host::{Engine, Exit, Guest, GuestModule};
use upstare_tests::random_pauses::{pause_at_random, RandomPauses};

use crate::Batch;

/// The longest wait between one resume and the next request: pauses come
/// about twice a millisecond, so a run of a second meets a few thousand.
const MAX_GAP_US: u64 = 1_000;

/// A request unanswered this long is a broken pause bound, not a result.
const DEADLINE: Duration = Duration::from_secs(30);

/// Request-to-paused times of one run.
pub struct Pauses {
    pub count: usize,
    pub median: Duration,
    pub p99: Duration,
    pub worst: Duration,
}

/// Runs `module` (instrumented) under random pauses; `expected` is what
/// the original printed.
pub fn measure(engine: &Engine, module: &GuestModule, batch: &Batch, scratch: &Path, expected: &[u8]) -> Pauses {
    let out = scratch.with_extension("paused.stdout");
    let guest = Guest::new(engine, module, crate::config(batch, scratch, &out)).unwrap();
    let RandomPauses { exit, mut times, .. } = pause_at_random(guest, 0..MAX_GAP_US, DEADLINE);
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
