//! Frames that cannot move to the new version: the update waits up to
//! `--timeout` for them to leave the stack, then refuses naming the function
//! and the point, and the old version serves on. kv's main waits in poll()
//! for as long as the server runs, so a version that changes main's frame
//! (`kv-server-stuck-frame`: its shadow-stack frame grows;
//! `kv-server-stuck-loop`: the code before poll() computes a value live
//! across it differently) can never be updated to while it runs. kv v9's
//! SLEEP keeps `sleep_command` on the stack for a while, and v10 changes
//! that function's frame: an update waits for the SLEEP to end.

use std::time::{Duration, Instant};

use upstare_tests::{expect_error, expect_report, guest, missing_keys, sha256_file, Client, Control, Server};

use crate::update::{seed, start_kv, stat};

/// A wait for main to leave the stack, which it never does.
const MAIN_TIMEOUT_MS: u64 = 300;

#[test]
fn a_main_that_cannot_move_is_refused_and_the_old_version_serves_on() {
    for stuck in ["kv-server-stuck-frame", "kv-server-stuck-loop"] {
        let (server, control) = start_kv("kv-server-v2", stuck);
        let seeded = seed(server.port, "f", 30);
        let running = control.running_version();
        let mut old = server.client();
        let before = old.request("STATS");

        let (out, took) = control.update_with_timeout(&guest(stuck), MAIN_TIMEOUT_MS);
        let reason = expect_error(&out, 1);
        assert!(reason.starts_with("update refused: "), "{stuck}: {reason}");
        assert!(reason.contains("`main`") && reason.contains("call to poll"), "{stuck}: the reason names main and the point: {reason}");
        assert!(reason.contains(&format!("{MAIN_TIMEOUT_MS} ms")), "{stuck}: the reason says how long it waited: {reason}");
        assert!(took >= Duration::from_millis(MAIN_TIMEOUT_MS), "{stuck}: it waited for main first ({took:?})");
        assert!(took < Duration::from_secs(10), "{stuck}: refused within seconds, not {took:?}");

        assert_eq!(control.running_version(), running, "{stuck}: v2 runs on");
        let after = old.request("STATS");
        assert_eq!(stat(&after, "requests"), stat(&before, "requests") + 1, "{stuck}: {before} then {after}");
        assert!(stat(&after, "wakeups") > stat(&before, "wakeups"), "{stuck}: {before} then {after}");
        assert_eq!(stat(&after, "keys"), seeded.len() as u64, "{stuck}: {after}");
        assert!(missing_keys(server.port, &seeded).is_empty(), "{stuck}");
    }
}

/// How long the SLEEP in flight during an update lasts: longer than
/// preparing the update takes (a few hundred ms in a debug build), so the
/// first attempt finds `sleep_command` on the stack.
pub(crate) const SLEEP_MS: u64 = 2500;

/// kv v9 with a SLEEP in flight on `sleeper`, sent at the returned instant.
pub(crate) fn v9_sleeping(tag: &str) -> (Server, Control, Client, Instant) {
    let (server, control) = start_kv("kv-server-v9", tag);
    let mut sleeper = server.client();
    assert_eq!(sleeper.request("SLEEP 1"), "SLEPT 1", "v9 answers SLEEP");
    sleeper.send(&format!("SLEEP {SLEEP_MS}"));
    let sent = Instant::now();
    // The server reads the line at once and sleeps in sleep_command.
    std::thread::sleep(Duration::from_millis(100));
    (server, control, sleeper, sent)
}

#[test]
fn an_update_waits_for_a_frame_that_cannot_move_to_leave_the_stack() {
    let (_server, control, mut sleeper, sent) = v9_sleeping("frames-wait");
    let v10 = guest("kv-server-v10");
    let (out, _) = control.update_with_timeout(&v10, 4 * SLEEP_MS);
    let done = sent.elapsed();
    let report = expect_report(&out);
    assert_eq!(report.sha256, sha256_file(&v10));
    // The test proves a wait only if the update was ready to apply while
    // the SLEEP still ran.
    let ready = Duration::from_millis(100 + report.count("prepare", "ms"));
    assert!(ready < Duration::from_millis(SLEEP_MS), "the update was prepared only after the SLEEP ended ({ready:?}): {report:?}");
    assert!(done >= Duration::from_millis(SLEEP_MS), "the update waited for the SLEEP to end, not {done:?}");
    assert_eq!(report.count("functions", "changed"), 1, "only sleep_command changed: {report:?}");

    // The SLEEP ended in v9's code; the next one runs v10's.
    assert_eq!(sleeper.read_line(), format!("SLEPT {SLEEP_MS}"));
    assert_eq!(sleeper.request("SLEEP 1"), "SLEPT 1 ms");
    assert_eq!(control.running_version(), report.sha256);
    let stats = sleeper.request("STATS");
    assert_eq!(stat(&stats, "requests"), 4, "SLEEP 1, SLEEP {SLEEP_MS}, SLEEP 1, STATS: {stats}");
}

#[test]
fn a_frame_still_on_the_stack_at_the_timeout_is_refused() {
    let (_server, control, mut sleeper, sent) = v9_sleeping("frames-timeout");
    let running = control.running_version();
    let timeout = 200;
    let (out, _) = control.update_with_timeout(&guest("kv-server-v10"), timeout);
    let reason = expect_error(&out, 1);
    assert!(sent.elapsed() < Duration::from_millis(SLEEP_MS), "refused at the timeout, before the SLEEP ended");
    assert!(reason.starts_with("update refused: "), "{reason}");
    assert!(reason.contains("`sleep_command`") && reason.contains("call to clock_nanosleep"), "the reason names the function and the point: {reason}");
    assert!(reason.contains(&format!("{timeout} ms")), "{reason}");

    assert_eq!(sleeper.read_line(), format!("SLEPT {SLEEP_MS}"), "the SLEEP goes on in v9");
    assert_eq!(sleeper.request("SLEEP 1"), "SLEPT 1", "still v9");
    assert_eq!(control.running_version(), running);
}
