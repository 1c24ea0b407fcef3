//! Live updates through the real binaries: a guest runs under `upstare-host`
//! with a control socket, `upstare-host update NEW.wasm` swaps in its next
//! version while clients keep talking to it, and the tests check what the
//! clients see (no dropped connection, no failed request, every key kept, the
//! new behaviour on connections opened before) and what the command reports.
//! Refused updates must leave the old version serving. The versions are the
//! chains in `guest-examples/*/versions`; the first tests here check them
//! without updating.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use upstare_tests::{
    example_guest_versions, expect_error, expect_report, guest, host_command, missing_keys, run_host, sha256_file,
    wait_for_path, Client, Control, KillOnDrop, Load, Server,
};

/// Every version in a `versions` file and the tests that update to it.
const TESTED_VERSIONS: &[(&str, &str, &str)] = &[
    ("compute", "compute-v2", "update.rs: compute_updated_in_the_middle_of_its_recursion"),
    ("kv-server", "kv-server-bad", "update.rs: refused_updates_leave_the_old_version_serving"),
    ("kv-server", "kv-server-stuck-frame", "frames.rs: a_main_that_cannot_move_is_refused_and_the_old_version_serves_on"),
    ("kv-server", "kv-server-stuck-loop", "frames.rs: a_main_that_cannot_move_is_refused_and_the_old_version_serves_on"),
    ("kv-server", "kv-server-trap", "transform.rs: a_transformer_that_traps_rolls_the_update_back"),
    ("kv-server", "kv-server-v10", "frames.rs: an_update_waits_for_a_frame_that_cannot_move_to_leave_the_stack"),
    ("kv-server", "kv-server-v11", "update.rs: a_typed_pointer_to_a_global_whose_type_changes_follows_it"),
    ("kv-server", "kv-server-v12", "update.rs: a_typed_pointer_to_a_global_whose_type_changes_follows_it"),
    ("kv-server", "kv-server-v13", "heap.rs: kv_entries_and_connections_gain_fields_on_the_heap_under_load"),
    ("kv-server", "kv-server-v2", "update.rs: kv_v1_to_v2_under_load, rollback.rs"),
    ("kv-server", "kv-server-v3", "update.rs: kv_v2_to_v3_under_load_carries_the_counts_field_by_field"),
    ("kv-server", "kv-server-v5", "transform.rs: a_c_transformer_carries_what_the_automatic_mapping_cannot"),
    ("kv-server", "kv-server-v9", "frames.rs: an_update_waits_for_a_frame_that_cannot_move_to_leave_the_stack"),
    ("poll-server", "poll-server-effect", "retreat.rs: a_global_written_before_poll_keeps_the_frame_from_going_back"),
    ("poll-server", "poll-server-trim", "retreat.rs: a_temporary_the_new_loop_computes_otherwise_is_refused_naming_it"),
    ("poll-server", "poll-server-v2", "retreat.rs: a_main_loop_changed_before_poll_is_updated_at_its_header_under_load"),
    ("poll-server", "poll-server-v3", "retreat.rs: a_main_loop_changed_before_poll_is_updated_at_its_header_under_load"),
    ("poll-server", "poll-server-v4", "retreat.rs: a_main_loop_changed_before_poll_is_updated_at_its_header_under_load"),
    ("poll-server", "poll-server-v5", "retreat.rs: a_main_loop_changed_before_poll_is_updated_at_its_header_under_load"),
    ("pool-server", "pool-server-v2", "threads.rs: the_pool_server_updates_every_worker_at_once_under_load"),
    ("pool-server", "pool-server-v3", "threads.rs: the_pool_server_updates_every_worker_at_once_under_load"),
    ("prefork-server", "prefork-server-trap", "processes.rs: a_constructor_that_traps_in_the_workers_rolls_the_update_back_in_every_process"),
    ("prefork-server", "prefork-server-v2", "processes.rs: the_prefork_server_updates_every_process_at_once_under_load"),
    ("recv-server", "recv-server-pinned", "rebuild.rs: a_pointer_to_the_line_buffer_in_a_global_keeps_the_frame_from_being_rebuilt"),
    ("recv-server", "recv-server-pinned-v2", "rebuild.rs: a_pointer_to_the_line_buffer_in_a_global_keeps_the_frame_from_being_rebuilt"),
    ("recv-server", "recv-server-v2", "rebuild.rs: a_serving_loop_whose_frame_grew_is_rebuilt_at_recv_with_its_partial_line_under_load"),
    ("recv-server", "recv-server-v3", "handler.rs: a_request_half_received_inside_a_changed_handler_completes_with_the_new_version"),
];

#[test]
fn every_guest_version_is_built_and_tested() {
    let listed: Vec<(String, String)> =
        TESTED_VERSIONS.iter().map(|(g, v, _)| (g.to_string(), v.to_string())).collect();
    assert_eq!(example_guest_versions(), listed, "update TESTED_VERSIONS and add tests for new versions");
    for (_, version, _) in TESTED_VERSIONS {
        guest(version);
    }
}

/// A kv server of the given version with a control socket; waits for its
/// listening line.
pub(crate) fn start_kv(version: &str, tag: &str) -> (Server, Control) {
    let control = Control::new(tag);
    let (server, first) = Server::start(&guest(version), &["--control", &control.path()], &[]);
    assert_eq!(first.trim(), "kv: listening on fd 3", "{version} starts");
    (server, control)
}

/// The `name=value` fields of a `STATS` reply, in order.
pub(crate) fn stats_fields(reply: &str) -> Vec<(String, u64)> {
    let rest = reply.strip_prefix("STATS ").unwrap_or_else(|| panic!("not a STATS reply: {reply:?}"));
    rest.split(' ')
        .map(|field| {
            let (k, v) = field.split_once('=').unwrap_or_else(|| panic!("bad field {field:?} in {reply:?}"));
            (k.to_string(), v.parse().unwrap_or_else(|_| panic!("bad number in {reply:?}")))
        })
        .collect()
}

/// One field of a `STATS` reply.
pub(crate) fn stat(reply: &str, name: &str) -> u64 {
    stats_fields(reply)
        .into_iter()
        .find_map(|(k, v)| (k == name).then_some(v))
        .unwrap_or_else(|| panic!("no {name}= in {reply:?}"))
}

/// Sets `n` keys of its own on a new connection and returns them.
pub(crate) fn seed(port: u16, prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut client = Client::connect(port);
    let keys: Vec<(String, String)> = (0..n).map(|i| (format!("{prefix}{i}"), format!("value {i} of {prefix}"))).collect();
    for (k, v) in &keys {
        assert_eq!(client.request(&format!("SET {k} {v}")), "OK");
    }
    keys
}

#[test]
fn each_kv_version_answers_like_v1_and_reports_its_stats() {
    for (version, fields) in [
        ("kv-server", &[][..]),
        ("kv-server-v2", &["requests", "keys", "wakeups"][..]),
        ("kv-server-v3", &["requests", "keys", "wakeups", "bytes_in"][..]),
    ] {
        let (mut server, first) = Server::start(&guest(version), &[], &[]);
        assert_eq!(first.trim(), "kv: listening on fd 3", "{version}");
        let mut c = server.client();
        let sent = ["SET a one two", "GET a", "COUNT", "FROB", "DEL a", "GET a"];
        let replies: Vec<String> = sent.iter().map(|l| c.request(l)).collect();
        assert_eq!(replies, ["OK", "VALUE one two", "COUNT 1", "ERROR unknown command", "DELETED", "NOT_FOUND"], "{version}");
        let stats = c.request("STATS");
        if fields.is_empty() {
            assert_eq!(stats, "ERROR unknown command", "{version}");
        } else {
            let got: Vec<String> = stats_fields(&stats).into_iter().map(|(k, _)| k).collect();
            assert_eq!(got, fields, "{version}: {stats}");
            assert_eq!(stat(&stats, "requests"), sent.len() as u64 + 1, "{version}: {stats}");
            assert_eq!(stat(&stats, "keys"), 0, "{version}: {stats}");
            assert!(stat(&stats, "wakeups") > sent.len() as u64, "{version}: {stats}");
            if fields.contains(&"bytes_in") {
                let bytes: usize = sent.iter().chain(["STATS"].iter()).map(|l| l.len() + 1).sum();
                assert_eq!(stat(&stats, "bytes_in"), bytes as u64, "{version}: {stats}");
            }
        }
        assert_eq!(c.request("SHUTDOWN"), "BYE");
        assert_eq!(server.wait(), Some(0), "{version}");
    }
}

/// The two compute versions differ in text only: the same numbers.
#[test]
fn compute_versions_compute_the_same_numbers() {
    let args = ["40", "300"];
    let v1 = run_host(&[&[guest("compute").to_str().unwrap()], &args[..]].concat());
    let v2 = run_host(&[&[guest("compute-v2").to_str().unwrap()], &args[..]].concat());
    assert!(v1.status.success() && v2.status.success(), "{v1:?} {v2:?}");
    assert_eq!(String::from_utf8_lossy(&v2.stdout), compute_v2_text(&String::from_utf8_lossy(&v1.stdout)));
}

/// What compute v2 prints, given what v1 prints (see the top of compute.c).
fn compute_v2_text(v1: &str) -> String {
    let body = v1.replace("\ndeep: sum ", "\ndeep: mean ");
    assert_ne!(body, v1, "v1 prints a `deep: sum` line: {v1}");
    format!("{body}compute: done (version 2)\n")
}

#[test]
fn kv_v1_to_v2_under_load() {
    let (server, control) = start_kv("kv-server", "update-v1-v2");
    let seeded = seed(server.port, "before", 200);
    let load = Load::start(server.port, 4, 30);
    load.wait_for_requests(200);
    // Opened before the update, used right after it.
    assert_eq!(load.command(0, "STATS"), Ok("ERROR unknown command".to_string()));

    let v2 = guest("kv-server-v2");
    let report = expect_report(&control.update(&v2));
    assert_eq!(report.sha256, sha256_file(&v2), "the report names the new version");
    assert_eq!(control.running_version(), report.sha256, "status shows the new version");
    assert!(report.count("functions", "changed") >= 1, "{report:?}");
    assert!(report.count("globals", "added") >= 1, "v2 adds `stats`: {report:?}");
    assert!(report.count("frames", "mapped") >= 1, "main waits in poll(): {report:?}");

    let stats = load.command(0, "STATS").expect("the connection survives the update");
    assert!(stat(&stats, "keys") as usize > seeded.len(), "{stats}");
    let later = load.command(1, "STATS").expect("another old connection");
    assert!(stat(&later, "requests") > stat(&stats, "requests"), "{stats} then {later}");
    load.wait_for_requests(200);
    let outcome = load.stop();
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(missing_keys(server.port, &seeded).is_empty(), "{:?}", missing_keys(server.port, &seeded));
    assert!(missing_keys(server.port, &outcome.stored).is_empty());
}

/// v2 -> v3 while three clients keep writing and reading: `stats` gains a
/// field in the middle, the other fields are carried by name, and every
/// request the server handled, before and after the update, is counted
/// exactly once.
#[test]
fn kv_v2_to_v3_under_load_carries_the_counts_field_by_field() {
    let (server, control) = start_kv("kv-server-v2", "update-v2-v3");
    let seeded = seed(server.port, "k", 50);
    let mut old = server.client();
    let before = old.request("STATS");
    assert_eq!(stat(&before, "requests"), seeded.len() as u64 + 1, "{before}");
    let load = Load::start(server.port, 3, 20);
    load.wait_for_requests(200);

    let report = expect_report(&control.update(&guest("kv-server-v3")));
    // `stats` grows a field: it cannot stay where it was.
    let changed = report.count("globals", "moved") + report.count("globals", "transformed");
    assert!(changed >= 1, "`stats` gains a field: {report:?}");
    load.wait_for_requests(200);
    let outcome = load.stop();
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

    let after = old.request("STATS");
    let names: Vec<String> = stats_fields(&after).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["requests", "keys", "wakeups", "bytes_in"], "{after}");
    let handled = stat(&before, "requests") + outcome.requests + 1;
    assert_eq!(stat(&after, "requests"), handled, "{before}, {} load requests, then {after}", outcome.requests);
    assert_eq!(stat(&after, "keys"), (seeded.len() + outcome.stored.len()) as u64, "{after}");
    assert!(stat(&after, "wakeups") > stat(&before, "wakeups") + 200, "{before} then {after}");
    // Bytes are counted from the update on: at least the load's requests
    // after it, and this STATS.
    assert!(stat(&after, "bytes_in") > 200 * "GET load0-0\n".len() as u64, "{after}");
    assert!(missing_keys(server.port, &seeded).is_empty());
    assert!(missing_keys(server.port, &outcome.stored).is_empty());
}

/// Each update may wait: under load, main is often paused inside its
/// request loop, where a compiler temporary of v1 and v2 has no counterpart
/// yet (issue 13's retreat to the loop header would move it), and the
/// update tries again until main is caught waiting in `poll`. On a busy
/// machine that can take longer than the default 2 s, so each update here
/// may wait 20 s; any refusal still fails the test.
#[test]
fn a_hundred_updates_back_and_forth_under_load() {
    let (server, control) = start_kv("kv-server", "update-100");
    let seeded = seed(server.port, "kept", 100);
    let load = Load::start(server.port, 3, 20);
    let (v1, v2) = (guest("kv-server"), guest("kv-server-v2"));
    let mut watcher = server.client();
    for i in 0..100 {
        let (to, stats_known) = if i % 2 == 0 { (&v2, true) } else { (&v1, false) };
        let (out, _) = control.update_with_timeout(to, 20_000);
        let report = expect_report(&out);
        assert_eq!(report.sha256, sha256_file(to), "update {i}");
        let stats = watcher.request("STATS");
        assert_eq!(stats.starts_with("STATS "), stats_known, "after update {i}: {stats}");
        assert!(load.failures().is_empty(), "after update {i}: {:?}", load.failures());
    }
    load.wait_for_requests(100);
    let outcome = load.stop();
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(missing_keys(server.port, &seeded).is_empty());
    assert!(missing_keys(server.port, &outcome.stored).is_empty());
}

#[test]
fn refused_updates_leave_the_old_version_serving() {
    let (server, control) = start_kv("kv-server-v2", "update-refused");
    let seeded = seed(server.port, "r", 50);
    let running = control.running_version();
    assert_eq!(running, sha256_file(&guest("kv-server-v2")));
    let mut old = server.client();
    let stats_before = old.request("STATS");

    let not_wasm = control.dir().join("not.wasm");
    std::fs::write(&not_wasm, "hello").unwrap();
    // A valid module, but not built with upstare-cc: no relocations, no DWARF.
    let bare = control.dir().join("bare.wasm");
    std::fs::write(&bare, wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#).unwrap())
        .unwrap();
    let missing = control.dir().join("missing.wasm");
    let unusable = [
        (&missing, format!("cannot read {}: No such file or directory (os error 2)", missing.display())),
        (&not_wasm, format!("{} is not a WebAssembly module (it does not start with the `\\0asm` magic number)", not_wasm.display())),
        (&bare, format!("{}: the module has no `linking` section: build it with bin/upstare-cc, which links with -Wl,--emit-relocs", bare.display())),
    ];
    for (path, expected) in unusable {
        assert_eq!(expect_error(&control.update(path), 2), expected);
    }

    // Another program: its functions are not this one's, so main's frame
    // (in poll) has nowhere to go, nor can it go back to its loop header.
    let compute = expect_error(&control.update(&guest("compute")), 1);
    assert!(compute.starts_with("update refused: main was still on the stack after 2000 ms and cannot move to the new version: `main` at call to poll #0: the function has 1 such points in the old version and 0 in the new one; it cannot go back to its loop header: "), "another program: {compute}");

    let bad = expect_error(&control.update(&guest("kv-server-bad")), 1);
    assert_eq!(
        bad,
        "update refused: global `stats` changed type and cannot be mapped: stats.requests: unsigned long became char* (keep the old type, or transform this value by hand)"
    );

    assert_eq!(control.running_version(), running, "still the old version");
    let stats_after = old.request("STATS");
    assert_eq!(stats_fields(&stats_after).len(), stats_fields(&stats_before).len(), "still v2: {stats_after}");
    assert_eq!(stat(&stats_after, "requests"), stat(&stats_before, "requests") + 1, "{stats_after}");
    assert!(missing_keys(server.port, &seeded).is_empty());
}

/// v11 keeps `&stats` in a global; v12 adds a field to `stats`, which then
/// moves to fresh memory, and reads it through that pointer. The heap
/// tracer finds the typed pointer and rewrites it: STATS counts on, through
/// the pointer, in the new copy.
#[test]
fn a_typed_pointer_to_a_global_whose_type_changes_follows_it() {
    let (server, control) = start_kv("kv-server-v11", "update-pointer");
    let seeded = seed(server.port, "p", 20);
    let mut old = server.client();
    let before = old.request("STATS");
    let report = expect_report(&control.update(&guest("kv-server-v12")));
    assert_eq!(report.count("globals", "moved"), 1, "{report:?}");
    assert_eq!(report.count("heap", "pointers rewritten"), 1, "{report:?}");
    assert_eq!(control.running_version(), sha256_file(&guest("kv-server-v12")), "v12 runs");
    let after = old.request("STATS");
    let again = old.request("STATS");
    assert_eq!(stat(&after, "requests"), stat(&before, "requests") + 1, "{before} then {after}");
    assert_eq!(stat(&again, "requests"), stat(&after, "requests") + 1, "counted in the copy the pointer reads: {after} then {again}");
    assert_eq!(stat(&again, "bytes_in"), stat(&after, "bytes_in") + "STATS\n".len() as u64, "{after} then {again}");
    assert!(missing_keys(server.port, &seeded).is_empty());
}

/// Long enough (several seconds) that the update lands mid-run.
const COMPUTE_ARGS: [&str; 2] = ["4000", "2000"];

#[test]
fn compute_updated_in_the_middle_of_its_recursion() {
    let control = Control::new("update-compute");
    let v2 = guest("compute-v2");
    let out_path = control.dir().join("out.txt");
    let mut running = KillOnDrop::spawn(
        host_command()
            .args(["--control", &control.path(), guest("compute").to_str().unwrap()])
            .args(COMPUTE_ARGS)
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(Stdio::null()),
    );
    // The uninterrupted run of the new version, meanwhile, for the expected
    // output (its numbers are v1's: see compute_versions_compute_the_same_numbers).
    let expected = std::thread::spawn(move || run_host(&[&[v2.to_str().unwrap()], &COMPUTE_ARGS[..]].concat()));
    wait_for_path(Path::new(&control.path()));
    std::thread::sleep(Duration::from_millis(300));

    let report = expect_report(&control.update(&guest("compute-v2")));
    assert!(running.0.try_wait().unwrap().is_none(), "the update landed before the end of the run");
    assert!(report.count("functions", "changed") >= 1, "main changed: {report:?}");
    assert!(report.count("frames", "mapped") >= 1, "main was on the stack: {report:?}");

    let status = running.0.wait().unwrap();
    assert!(status.success());
    let expected = expected.join().unwrap();
    assert!(expected.status.success());
    let got = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(got, String::from_utf8_lossy(&expected.stdout), "v2's text, with the numbers of the whole run");
}
