//! Program memory stays flat over many live updates: each update reserves
//! fresh memory for what its version adds, and the area of a version no
//! longer running, or of an update that did not happen, is reused by the
//! next update instead of growing memory again. The figures are those
//! `upstare-host status` reports.

use upstare_tests::{expect_error, expect_report, guest, sha256_file, Load, MemoryFigures};

use crate::update::{seed, start_kv};

/// v1 -> v2 -> v1 -> ... under load: after the first updates (each version
/// of the pair has its area, and both are reused from then on), neither the
/// memory nor its fresh areas grow, and every request is still answered.
#[test]
fn memory_stops_growing_after_the_first_updates_of_two_hundred() {
    let (server, control) = start_kv("kv-server", "fresh-200");
    let seeded = seed(server.port, "kept", 100);
    let load = Load::start(server.port, 3, 20);
    let (v1, v2) = (guest("kv-server"), guest("kv-server-v2"));
    let before = control.memory();
    assert_eq!((before.fresh_used, before.fresh_free), (0, 0), "no update yet: {before:?}");
    let mut settled: Option<MemoryFigures> = None;
    for i in 0..200 {
        // Under load main may be caught inside its request loop, where it
        // cannot move yet: the update then waits (see update.rs).
        let to = [&v2, &v1][i % 2];
        assert_eq!(expect_report(&control.update_with_timeout(to, 20_000).0).sha256, sha256_file(to), "update {i}");
        let now = control.memory();
        match settled {
            None if i == 3 => settled = Some(now),
            None => {}
            // Which area is in use and which free depends on whether a
            // frame still pointed into the retired one at the commit (a
            // string literal of the old version, under load): only growth
            // counts, and one more area may be reserved while an old one
            // is held that way (it is reused once let go), never more.
            Some(s) => assert!(
                now.size <= s.size + 65536 && now.fresh_used + now.fresh_free <= s.fresh_used + s.fresh_free + 65536,
                "update {i}: memory grew again ({now:?}, settled at {s:?} after 4 updates)"
            ),
        }
        assert!(load.failures().is_empty(), "after update {i}: {:?}", load.failures());
    }
    let settled = settled.unwrap();
    // Two versions, one area each (they fit in a page or two).
    assert!(settled.fresh_used + settled.fresh_free <= 4 * 65536, "{settled:?}");
    assert!(settled.size - before.size <= settled.fresh_used + settled.fresh_free, "{before:?} then {settled:?}");
    load.wait_for_requests(100);
    load.stop_and_check(server.port, &seeded);
}

/// An update that is refused (main cannot move) or rolled back (its
/// transformer traps) after its fresh area was reserved hands the area
/// back. The first one grows memory (the area is reserved while the
/// program runs, before anyone knows the update will fail, and wasm memory
/// cannot shrink); from then on failed updates take the free area and give
/// it back, and the next good update reuses it: memory stays as it was.
#[test]
fn refused_and_rolled_back_updates_leave_memory_as_it_was() {
    let (server, control) = start_kv("kv-server-v2", "fresh-refused");
    let seeded = seed(server.port, "r", 50);
    let load = Load::start(server.port, 2, 10);
    let (stuck, trap) = (guest("kv-server-stuck-frame"), guest("kv-server-trap"));
    let running = sha256_file(&guest("kv-server-v2"));
    let refuse = |to: &std::path::Path| {
        let (out, _) = control.update_with_timeout(to, 300);
        let reason = expect_error(&out, 1);
        assert!(
            reason.starts_with("update refused: main was still on the stack")
                || reason.starts_with("update refused: applying it failed and it was rolled back: transformer `upstare_transform_stats` failed"),
            "{reason}"
        );
        assert_eq!(control.running_version(), running, "v2 serves on");
    };

    let start = control.memory();
    refuse(&stuck);
    let after_first = control.memory();
    assert_eq!(after_first.fresh_used, 0, "the refused update's area is not in use: {after_first:?}");
    assert_eq!(after_first.fresh_free, after_first.size - start.size, "{start:?} then {after_first:?}");
    for (i, to) in [&stuck, &trap, &stuck, &trap, &trap].into_iter().enumerate() {
        refuse(to);
        assert_eq!(control.memory(), after_first, "failed update {i} changed memory");
    }
    // A good update takes the area the failed ones left free.
    let report = expect_report(&control.update_with_timeout(&guest("kv-server"), 20_000).0);
    assert_eq!(report.sha256, sha256_file(&guest("kv-server")));
    let after_good = control.memory();
    assert_eq!(after_good.size, after_first.size, "{after_first:?} then {after_good:?}");
    assert_eq!((after_good.fresh_used, after_good.fresh_free), (after_first.fresh_free, 0), "{after_good:?}");

    load.stop_and_check(server.port, &seeded);
}
