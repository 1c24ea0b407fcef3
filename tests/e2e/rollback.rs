//! `upstare-host rollback`: back to the version that ran before the last
//! update, with the state carried back, or a refusal with the reason when
//! there is none or the update cannot be inverted.

use upstare_tests::{expect_error, expect_report, guest, sha256_file};

use crate::update::{seed, start_kv, stat, stats_fields};

#[test]
fn rollback_after_v1_to_v2_returns_to_v1() {
    let (server, control) = start_kv("kv-server", "rollback-v1");
    let v1 = guest("kv-server");
    let seeded = seed(server.port, "k", 100);
    let mut old = server.client();

    let nothing = expect_error(&control.rollback(), 1);
    assert_eq!(nothing, "no previous version to return to: the program has not been updated");
    assert_eq!(control.running_version(), sha256_file(&v1));

    expect_report(&control.update(&guest("kv-server-v2")));
    assert!(old.request("STATS").starts_with("STATS "));
    assert_eq!(old.request("SET during v2"), "OK");

    let report = expect_report(&control.rollback());
    assert_eq!(report.sha256, sha256_file(&v1), "the report names the version rolled back to");
    assert_eq!(control.running_version(), report.sha256);
    assert_eq!(old.request("STATS"), "ERROR unknown command", "v1 again, on a connection opened before");
    assert_eq!(old.request("GET during"), "VALUE v2");
    assert_eq!(old.request("COUNT"), format!("COUNT {}", seeded.len() + 1));
    assert!(upstare_tests::missing_keys(server.port, &seeded).is_empty());
}

/// v2 -> v3 changed the type of `stats` (a field added): going back would
/// drop `bytes_in`, so the rollback is refused with a reason that names the
/// global, and v3 serves on with its counts.
#[test]
fn rollback_after_a_type_change_is_refused_naming_the_global() {
    let (server, control) = start_kv("kv-server-v2", "rollback-v3");
    let seeded = seed(server.port, "k", 20);
    let mut old = server.client();
    expect_report(&control.update(&guest("kv-server-v3")));
    let before = old.request("STATS");
    let v3 = sha256_file(&guest("kv-server-v3"));
    assert_eq!(control.running_version(), v3);

    let reason = expect_error(&control.rollback(), 1);
    assert_eq!(
        reason,
        "cannot roll back: the update changed the type of stats.bytes_in, and going back would lose it",
    );
    assert_eq!(control.running_version(), v3, "v3 runs on");
    let after = old.request("STATS");
    let names: Vec<String> = stats_fields(&after).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["requests", "keys", "wakeups", "bytes_in"], "{after}");
    assert_eq!(stat(&after, "requests"), stat(&before, "requests") + 1, "{before} then {after}");
    assert!(stat(&after, "bytes_in") > stat(&before, "bytes_in"), "{before} then {after}");
    assert!(upstare_tests::missing_keys(server.port, &seeded).is_empty());
}

/// Each rollback steps back one version: v1 -> v2 -> v9, then back to v2
/// (STATS still answers, SLEEP no longer does), then back to v1, and then
/// there is nothing further back. The keys survive every step.
#[test]
fn rollback_steps_back_two_versions_one_at_a_time() {
    let (server, control) = start_kv("kv-server", "rollback-two");
    let seeded = seed(server.port, "k", 30);
    let mut old = server.client();
    let (v1, v2, v9) = (guest("kv-server"), guest("kv-server-v2"), guest("kv-server-v9"));
    expect_report(&control.update(&v2));
    expect_report(&control.update(&v9));
    assert_eq!(old.request("SLEEP 1"), "SLEPT 1");

    let back = expect_report(&control.rollback());
    assert_eq!(back.sha256, sha256_file(&v2));
    assert_eq!(control.running_version(), sha256_file(&v2));
    assert_eq!(old.request("SLEEP 1"), "ERROR unknown command", "v9's command is gone");
    assert!(old.request("STATS").starts_with("STATS "), "v2 answers STATS");

    let back = expect_report(&control.rollback());
    assert_eq!(back.sha256, sha256_file(&v1));
    assert_eq!(control.running_version(), sha256_file(&v1));
    assert_eq!(old.request("STATS"), "ERROR unknown command", "v1 again");

    let nothing = expect_error(&control.rollback(), 1);
    assert_eq!(nothing, "no previous version to return to: the program has not been updated");
    assert_eq!(control.running_version(), sha256_file(&v1));
    assert_eq!(old.request("COUNT"), format!("COUNT {}", seeded.len()));
    assert!(upstare_tests::missing_keys(server.port, &seeded).is_empty());
}
