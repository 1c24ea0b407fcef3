//! Heap objects of changed types, converted live: the heap is traced by
//! type from the globals, every allocation of a changed struct is
//! reallocated through the program's own `malloc` at its new size and
//! converted member by member (new members zero), and every typed pointer to
//! it is rewritten, with no code written for it.

use upstare_tests::{expect_report, guest, missing_keys, sha256_file, Load};

use crate::update::{seed, start_kv};

/// kv v13 gives every key's entry a `hits` counter and every connection a
/// `requests` counter, each placed so that the members after it move. The
/// entries hang off a bucket array off `store`; the connections off the
/// `conns` array. Connections opened before the update, one of them with
/// half a request line buffered, go on with their counters starting at zero.
#[test]
fn kv_entries_and_connections_gain_fields_on_the_heap_under_load() {
    let (server, control) = start_kv("kv-server-v2", "heap-v2-v13");
    let seeded = seed(server.port, "k", 300);
    let mut reader = server.client();
    for (key, value) in seeded.iter().step_by(7) {
        assert_eq!(reader.request(&format!("GET {key}")), format!("VALUE {value}"));
    }
    let mut partial = server.client();
    partial.send_raw("GET k1");
    let load = Load::start(server.port, 3, 20);
    load.wait_for_requests(200);

    let report = expect_report(&control.update(&guest("kv-server-v13")));
    assert_eq!(report.sha256, sha256_file(&guest("kv-server-v13")));
    // 300 seeded keys, the load's 60, and the 5 open connections.
    let converted = report.count("heap", "objects converted");
    assert!(converted >= 365, "{report:?}");
    assert!(report.count("heap", "pointers rewritten") >= converted, "{report:?}");
    load.wait_for_requests(200);
    let outcome = load.stop();
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

    // The partial line was kept in its connection's converted buffer.
    partial.send_raw("0\n");
    assert_eq!(partial.read_line(), "VALUE value 10 of k");
    assert_eq!(partial.request("MINE"), "MINE 2", "the finished line and MINE count, nothing before");
    assert_eq!(reader.request("MINE"), "MINE 1");
    // Every entry was converted: GETs before the update did not count.
    assert_eq!(reader.request("HITS k0"), "HITS 0");
    assert_eq!(reader.request("HITS k10"), "HITS 1", "the partial GET finished after the update");
    assert_eq!(reader.request("GET k7"), "VALUE value 7 of k");
    assert_eq!(reader.request("HITS k7"), "HITS 1");
    assert!(missing_keys(server.port, &seeded).is_empty());
    assert!(missing_keys(server.port, &outcome.stored).is_empty());
    // Entries made by the new version work alongside converted ones.
    assert_eq!(reader.request("SET fresh one"), "OK");
    assert_eq!(reader.request("GET fresh"), "VALUE one");
    assert_eq!(reader.request("HITS fresh"), "HITS 1");
}
