//! Real pauses at random moments: a guest runs to its end on a thread of
//! its own while the caller's thread asks for a pause after each random
//! wait, waits until the guest has unwound, and resumes it. The end-to-end
//! tests check what such a guest prints; the overhead bench also times
//! each request until the guest has paused.

use std::ops::Range;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use upstare_host::{Exit, Guest, GUEST_THREAD_STACK};

/// How a run under random pauses went.
pub struct RandomPauses {
    /// How the guest ended.
    pub exit: Exit,
    /// For each pause, from the request until `Guest::run` had returned
    /// `Exit::Paused` (the stack unwound and its frames read).
    pub times: Vec<Duration>,
    /// Whether the guest ran its module's unwind-only variant
    /// (`GuestModule::is_unwind_only`) when it started, and when it ended.
    pub unwind_only: [bool; 2],
}

/// Runs `guest` (instrumented) to its end, asking for a pause after each
/// wait of a random number of microseconds in `gaps`, and resuming it once
/// paused; the next wait starts once its rewind has ended. Panics if a
/// request is neither answered nor the rewind ended within `deadline`:
/// the pause bound (or a rewind) is broken, and a test must fail rather
/// than hang.
pub fn pause_at_random(mut guest: Guest, gaps: Range<u64>, deadline: Duration) -> RandomPauses {
    let pause = guest.pause_handle().expect("an instrumented guest can pause");
    // What the guest's thread reports: when it paused (no exit) or ended.
    let (report, reports) = channel::<(Instant, Option<Exit>)>();
    let (resume, resumed) = channel::<()>();
    let at_start = guest.module().is_unwind_only();
    let runner = std::thread::Builder::new()
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || loop {
            match guest.run() {
                Exit::Paused => {
                    report.send((Instant::now(), None)).unwrap();
                    if resumed.recv().is_err() {
                        return guest.module().is_unwind_only();
                    }
                }
                exit => {
                    report.send((Instant::now(), Some(exit))).unwrap();
                    return guest.module().is_unwind_only();
                }
            }
        })
        .unwrap();
    let (mut times, mut rng) = (Vec::new(), 0x2545_f491_u64);
    let exit = loop {
        // xorshift: waits that no loop of the guest can keep in step with.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let gap = Duration::from_micros(gaps.start + rng % (gaps.end - gaps.start).max(1));
        match reports.recv_timeout(gap) {
            Ok((_, Some(exit))) => break exit,
            Ok((_, None)) => panic!("the guest paused with no request"),
            Err(RecvTimeoutError::Disconnected) => panic!("the guest's thread ended without an exit"),
            Err(RecvTimeoutError::Timeout) => {}
        }
        let asked = pause.request();
        let answer = reports.recv_timeout(deadline);
        match answer.unwrap_or_else(|_| panic!("the guest did not pause within {deadline:?} after {} pauses", times.len())) {
            (at, None) => {
                times.push(at.duration_since(asked));
                resume.send(()).unwrap();
                let resuming = Instant::now();
                while !pause.frame_stack_empty() {
                    assert!(resuming.elapsed() < deadline, "the guest did not finish its rewind after {} pauses", times.len());
                    std::thread::yield_now();
                }
            }
            // Finished before it reached an update point.
            (_, Some(exit)) => break exit,
        }
    };
    let at_end = runner.join().unwrap();
    RandomPauses { exit, times, unwind_only: [at_start, at_end] }
}
