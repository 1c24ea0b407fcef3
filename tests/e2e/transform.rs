//! State transformers written in C: a new version that changes a global's
//! type beyond what the automatic mapping can carry declares
//! `UPSTARE_TRANSFORM(global)`, and the host runs it during the update. kv
//! v2 counts requests in `stats.requests`; v5 makes that field the last
//! command's name and brings a transformer that carries `wakeups` and names
//! where the value came from; `kv-server-trap` is v5 with a transformer that
//! traps, which must roll the update back.

use upstare_tests::{expect_error, expect_report, guest, missing_keys, sha256_file, Load};

use crate::update::{seed, start_kv, stat};

/// What v5's transformer stores in `stats.requests` (see kv.c).
const FROM_V2: &str = "(from-v2)";

/// The value of `name=` in a STATS reply, as text (v5's `last` is a name).
fn field<'a>(reply: &'a str, name: &str) -> &'a str {
    reply
        .strip_prefix("STATS ")
        .unwrap_or_else(|| panic!("not a STATS reply: {reply:?}"))
        .split(' ')
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name}= in {reply:?}"))
}

/// A count in a v5 STATS reply ([`stat`] reads v2's, all numbers).
fn count(reply: &str, name: &str) -> u64 {
    field(reply, name).parse().unwrap_or_else(|_| panic!("{name} is not a number in {reply:?}"))
}

#[test]
fn a_c_transformer_carries_what_the_automatic_mapping_cannot() {
    let (server, control) = start_kv("kv-server-v2", "transform-v5");
    let seeded = seed(server.port, "t", 40);
    let mut old = server.client();
    let before = old.request("STATS");
    // Each SET woke poll() at least once: a count that started over after
    // the update would be below this.
    assert!(stat(&before, "wakeups") > seeded.len() as u64, "{before}");

    let v5 = guest("kv-server-v5");
    let report = expect_report(&control.update(&v5));
    assert_eq!(report.sha256, sha256_file(&v5));
    assert_eq!(report.count("globals", "transformed"), 1, "`stats` is transformed by its C transformer: {report:?}");
    assert_eq!(report.count("globals", "moved"), 0, "no global is converted without it: {report:?}");
    assert!(report.count("frames", "mapped") >= 1, "main waits in poll(): {report:?}");
    assert_eq!(control.running_version(), report.sha256);

    // Nothing else was asked since the update: the name is the transformer's.
    let after = old.request("STATS");
    assert_eq!(field(&after, "last"), FROM_V2, "{after}");
    assert!(count(&after, "wakeups") > stat(&before, "wakeups"), "wakeups carried by the transformer: {before} then {after}");
    assert_eq!(count(&after, "keys"), seeded.len() as u64, "{after}");

    // v5 then serves a load as any version does, and names what it handles.
    let load = Load::start(server.port, 3, 20);
    load.wait_for_requests(300);
    let outcome = load.stop();
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    let later = old.request("STATS");
    assert!(["SET", "GET"].contains(&field(&later, "last")), "{later}");
    assert!(count(&later, "wakeups") > count(&after, "wakeups"), "{after} then {later}");
    assert!(missing_keys(server.port, &seeded).is_empty(), "{:?}", missing_keys(server.port, &seeded));
    assert!(missing_keys(server.port, &outcome.stored).is_empty());
}

#[test]
fn a_transformer_that_traps_rolls_the_update_back() {
    let (server, control) = start_kv("kv-server-v2", "transform-trap");
    let seeded = seed(server.port, "t", 40);
    let v2 = sha256_file(&guest("kv-server-v2"));
    let mut old = server.client();
    let before = old.request("STATS");

    // The transformer overwrites v2's `stats` before it traps. With no
    // client talking, nothing but the update touches memory between these
    // two checkpoints.
    let idle = control.checkpoint("before");
    let reason = expect_error(&control.update(&guest("kv-server-trap")), 1);
    assert!(reason.contains("rolled back"), "{reason}");
    assert!(reason.contains("transformer") && reason.contains("upstare_transform_stats"), "the reason names the transformer: {reason}");
    assert_eq!(control.running_version(), v2, "v2 runs on");
    let rolled_back = control.checkpoint("after");
    // The update reserved fresh memory for v5's data; the rest must be
    // byte for byte what it was.
    assert!(rolled_back.memory.len() > idle.memory.len(), "the update reserved fresh memory");
    let first_difference = idle.memory.iter().zip(&rolled_back.memory).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "memory differs after the rollback");
    assert_eq!(rolled_back.globals, idle.globals);
    assert_eq!(rolled_back.frames, idle.frames);

    // v2's counts, as they were plus this request: the memory the
    // transformer ran over is v2's again.
    let after = old.request("STATS");
    assert_eq!(stat(&after, "requests"), stat(&before, "requests") + 1, "{before} then {after}");
    assert!(stat(&after, "wakeups") > stat(&before, "wakeups"), "{before} then {after}");
    assert_eq!(stat(&after, "keys"), seeded.len() as u64, "{after}");
    assert!(missing_keys(server.port, &seeded).is_empty(), "{:?}", missing_keys(server.port, &seeded));

    // And the program is still updatable: the working transformer runs
    // from the same state.
    let report = expect_report(&control.update(&guest("kv-server-v5")));
    assert_eq!(report.count("globals", "transformed"), 1, "{report:?}");
    let v5 = old.request("STATS");
    assert_eq!(field(&v5, "last"), FROM_V2, "{v5}");
    assert!(count(&v5, "wakeups") > stat(&after, "wakeups"), "{after} then {v5}");
}
