//! Every example guest has end-to-end tests: adding a guest without tests
//! fails here.

use upstare_tests::example_guest_names;

/// The example guests and the test module that covers each.
const TESTED: &[(&str, &str)] = &[("compute", "compute.rs"), ("files", "files.rs"), ("kv-server", "kv.rs"), ("poll-server", "retreat.rs"), ("pool-server", "threads.rs"), ("prefork-server", "processes.rs"), ("recv-server", "rebuild.rs")];

#[test]
fn every_example_guest_has_tests() {
    let tested: Vec<String> = TESTED.iter().map(|(g, _)| g.to_string()).collect();
    assert_eq!(example_guest_names(), tested, "update TESTED and add tests for new guests");
}
