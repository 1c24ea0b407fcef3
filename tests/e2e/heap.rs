//! Heap objects of changed types, converted live: the heap is traced by
//! type from the globals, every allocation of a changed struct is
//! reallocated through the program's own `malloc` at its new size and
//! converted member by member (new members zero), and every typed pointer to
//! it is rewritten, with no code written for it.

use upstare_tests::{expect_error, expect_report, guest, missing_keys, sha256_file, Client, Control, Load, Server};

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

/// A heapgraph server of `version` with a control socket, grown to 1,000
/// elements in each structure, and a client on it.
fn start_graph(version: &str, tag: &str) -> (Server, Control, Client) {
    let control = Control::new(tag);
    let (server, first) = Server::start(&guest(version), &["--control", &control.path()], &[]);
    assert_eq!(first.trim(), "heapgraph: listening", "{version} starts");
    let mut client = server.client();
    assert_eq!(client.request("GROW 1000"), "GREW 1000");
    (server, control, client)
}

const SUM_OF_1000: &str =
    "SUM list=1000/500500 tree=1000/49942098/ok recs=1000/500500/124875.00 heaviest=249.75/ok";

/// Every element of a linked list, of a tree whose nodes point to their
/// parents, and of an array allocated as `malloc(n * sizeof)` and grown by
/// `realloc` is converted, with the pointer into one record's member
/// (`heaviest`) following it; the new version's `realloc` then grows the
/// converted array.
#[test]
fn a_list_a_tree_with_parents_and_a_grown_array_are_converted_element_by_element() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-graph");
    assert_eq!(client.request("SUM"), SUM_OF_1000);
    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    // 1,000 list nodes, 1,000 tree nodes, one array.
    assert_eq!(report.count("heap", "objects converted"), 2001, "{report:?}");
    // `list` and 999 `next`s; `root`, 999 `left`s and `right`s and 999
    // `parent`s; `records.recs` and `records.heaviest`.
    assert_eq!(report.count("heap", "pointers rewritten"), 3001, "{report:?}");
    assert_eq!(client.request("SUM"), SUM_OF_1000, "every structure whole, in the new layout");
    assert_eq!(client.request("FRESH"), "FRESH nodes=1000 trees=1000 recs=1000", "new members start at zero");
    assert_eq!(client.request("GROW 10"), "GREW 1010");
    assert_eq!(
        client.request("SUM"),
        "SUM list=1010/510555 tree=1010/50565273/ok recs=1010/510555/125383.75 heaviest=249.75/ok"
    );
    assert_eq!(client.request("FRESH"), "FRESH nodes=1000 trees=1000 recs=1000");
}

/// A tree wide enough that the tracer reads its widest generations on two
/// threads converts as a small one does: every node, every pointer, the
/// same sums after.
#[test]
fn a_heap_traced_on_two_threads_is_converted_whole() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-wide");
    assert_eq!(client.request("GROW 99000"), "GREW 100000");
    let sums = client.request("SUM");
    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    assert_eq!(report.count("heap", "objects converted"), 200_001, "{report:?}");
    assert_eq!(report.count("heap", "pointers rewritten"), 300_001, "{report:?}");
    assert_eq!(client.request("SUM"), sums, "every structure whole, in the new layout");
    assert_eq!(client.request("FRESH"), "FRESH nodes=100000 trees=100000 recs=100000");
}

/// The tracer cannot tell what a `void *` holds: when it holds the address
/// of an object that would be converted, the update is refused, naming it.
#[test]
fn a_void_pointer_to_an_object_of_a_changed_type_refuses_the_update() {
    let (_server, control, mut client) = start_graph("heapgraph-opaque", "heap-opaque");
    let reason = expect_error(&control.update(&guest("heapgraph-opaque-v2")), 1);
    assert!(
        reason.starts_with("update refused: the heap cannot be converted: opaque may hold a pointer to an object of changed type struct node"),
        "{reason}"
    );
    assert_eq!(control.running_version(), sha256_file(&guest("heapgraph-opaque")));
    assert_eq!(client.request("SUM"), SUM_OF_1000);
    assert_eq!(client.request("FRESH"), "ERROR unknown command", "the old version serves on");
}

/// A heap word that holds the address of a global whose type changes
/// follows the global to its new place when its type says it is a pointer
/// to it; a `void *` there refuses the update, naming the global (the
/// tracer scans the heap's untyped words for what moves, globals included).
#[test]
fn a_heap_pointer_to_a_global_that_moves_is_rewritten_or_refuses() {
    let (_server, control, mut client) = start_graph("heapgraph-boxed", "heap-boxed");
    assert_eq!(client.request("BOX"), "BOX same calls=1");
    let report = expect_report(&control.update(&guest("heapgraph-boxed-v2")));
    assert!(report.count("heap", "pointers rewritten") >= 3002, "`box`'s target too: {report:?}");
    assert_eq!(client.request("BOX"), "BOX same calls=1", "the heap word holds the counter's new address");
    assert_eq!(client.request("GROW 1"), "GREW 1001");
    assert_eq!(client.request("BOX"), "BOX same calls=2");

    let (_server, control, mut client) = start_graph("heapgraph-boxed-opaque", "heap-boxed-opaque");
    let reason = expect_error(&control.update(&guest("heapgraph-boxed-opaque-v2")), 1);
    assert!(reason.starts_with("update refused: the heap cannot be converted: *box may hold a pointer to global `counter`, whose type changed"), "{reason}");
    assert_eq!(client.request("BOX"), "BOX same calls=1", "the old version serves on");
    assert_eq!(control.running_version(), sha256_file(&guest("heapgraph-boxed-opaque")));
}

/// A table of `void *` values holds copies of list nodes that no typed
/// pointer reaches: the tracer cannot tell they are nodes, so an update
/// that changes `struct node` is refused, naming the slot, rather than
/// leaving them in the old layout. The new version's
/// `UPSTARE_POINTS_TO(slot, value, struct node)` says what the values are:
/// the same update then converts the 16 copies with the rest.
#[test]
fn a_void_pointer_table_is_refused_until_the_new_version_says_what_it_holds() {
    let (_server, control, mut client) = start_graph("heapgraph-table", "heap-table");
    let table = "TABLE sum=15880"; // the copies of nodes 985 to 1000
    assert_eq!(client.request("TABLE"), table);
    let reason = expect_error(&control.update(&guest("heapgraph-table-v2")), 1);
    assert!(reason.starts_with("update refused: the heap cannot be converted: table["), "{reason}");
    assert!(
        reason.contains("].value points to an allocation of 12 bytes whose type no typed pointer tells: it may hold `struct node`"),
        "{reason}"
    );
    assert_eq!(client.request("TABLE"), table, "the old version serves on");

    let report = expect_report(&control.update(&guest("heapgraph-table-rule")));
    assert_eq!(report.count("heap", "objects converted"), 2017, "{report:?}");
    assert_eq!(client.request("TABLE"), format!("{table} fresh=16"));
    assert_eq!(client.request("SUM"), SUM_OF_1000);
}

/// Which member of a union is live is unknown, so a union over a changed
/// struct cannot be carried.
#[test]
fn a_union_over_a_changed_struct_refuses_the_update() {
    let (_server, control, mut client) = start_graph("heapgraph-union", "heap-union");
    let reason = expect_error(&control.update(&guest("heapgraph-union-v2")), 1);
    assert!(reason.contains("global `either` changed type") && reason.contains("union either changed layout"), "{reason}");
    assert_eq!(client.request("SUM"), SUM_OF_1000);
}

/// v3's transformer traps after the heap was converted (objects allocated,
/// pointers rewritten, members copied): the rollback leaves memory byte for
/// byte as it was, allocator state included, and v2 then applies.
#[test]
fn a_failure_after_the_heap_was_converted_rolls_back_byte_for_byte() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-rollback");
    let idle = control.checkpoint("before");
    let reason = expect_error(&control.update(&guest("heapgraph-trap")), 1);
    assert!(reason.contains("rolled back") && reason.contains("upstare_transform_grown"), "{reason}");
    let rolled_back = control.checkpoint("after");
    // Memory may have grown (fresh memory, or malloc asking for more);
    // what was there is as it was.
    let first_difference = idle.memory.iter().zip(&rolled_back.memory).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "memory differs after the rollback");
    assert_eq!(rolled_back.globals, idle.globals);
    assert_eq!(rolled_back.frames, idle.frames);
    assert_eq!(client.request("SUM"), SUM_OF_1000);
    assert_eq!(client.request("GROW 5"), "GREW 1005", "the old allocator state works");

    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    assert_eq!(report.count("heap", "objects converted"), 2011, "{report:?}");
    assert_eq!(client.request("FRESH"), "FRESH nodes=1005 trees=1005 recs=1005");
}

/// A frame that holds the list's head in a local while it waits for input
/// (HOLD) is on the stack when the update lands: the local is a pointer by
/// the new version's DWARF, so it is rewritten to the head's new copy, and
/// the reply reads the head through it in the new layout.
#[test]
fn a_pointer_held_in_a_waiting_frame_follows_its_object() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-frame");
    assert_eq!(client.request("HOLD"), "HOLDING", "inside HOLD, waiting");
    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    // The 3,001 pointers in memory and the frame's local.
    assert_eq!(report.count("heap", "pointers rewritten"), 3002, "{report:?}");
    client.send("go on");
    assert_eq!(client.read_line(), "HELD 1000", "the head, read through the rewritten local");
    assert_eq!(client.request("SUM"), SUM_OF_1000);
}

/// A list node that only an integer in a waiting frame holds (LOOSE), as a
/// compiler temporary would: no typed pointer reaches it, so the trace
/// cannot see that it is a node. Its allocation fits `struct node`, whose
/// layout changes, so the update waits for the value to go and is refused
/// when it stays: the old version serves on and reads the node as it was.
/// Once the frame has let go, the same update applies.
#[test]
fn an_object_that_only_an_untyped_frame_value_holds_stops_the_update() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-loose");
    assert_eq!(client.request("LOOSE"), "LOOSE", "inside LOOSE, waiting");
    let reason = expect_error(&control.update(&guest("heapgraph-v2")), 1);
    assert!(
        reason.contains("a frame of `loose` holds the address of an allocation of")
            && reason.contains("that no typed pointer reaches: it may hold `struct node`"),
        "{reason}"
    );
    assert_eq!(control.running_version(), sha256_file(&guest("heapgraph")));
    client.send("go on");
    assert_eq!(client.read_line(), "LOOSE 7", "the node, as the old version laid it out");
    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    assert_eq!(report.count("heap", "objects converted"), 2001, "{report:?}");
    assert_eq!(client.request("SUM"), SUM_OF_1000);
}

/// A list that no global reaches (CHAIN): its head is a local of a frame
/// waiting for input, its last node sits in the frame's memory. The frame's
/// variables are roots of the trace too, so its 50 nodes are converted with
/// the 2,001 allocations the globals reach, and both of the frame's pointers
/// follow them: the new version reads the list in its own layout, every new
/// member zeroed.
#[test]
fn a_list_whose_only_head_is_in_a_waiting_frame_is_converted() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-frame-list");
    assert_eq!(client.request("CHAIN 50"), "CHAINING", "inside CHAIN, waiting");
    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    assert_eq!(report.count("heap", "objects converted"), 2051, "{report:?}");
    client.send("go on");
    assert_eq!(client.read_line(), "CHAINED 1275 tail=1 fresh=50", "the frame's list, in the new layout");
    assert_eq!(client.request("SUM"), SUM_OF_1000);
}

/// v4 renames the list nodes' `value` to `weight`: by name, the automatic
/// mapping drops one and zeroes the other. Its `UPSTARE_CONVERT(node)`
/// copies it across for every node, after the mapping and the pointer
/// rewrites (the nodes' `next` already leads to new copies).
#[test]
fn a_converter_in_c_carries_a_renamed_member_of_every_object() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-convert");
    let report = expect_report(&control.update(&guest("heapgraph-renamed")));
    assert_eq!(report.count("heap", "objects converted"), 2001, "{report:?}");
    assert_eq!(client.request("SUM"), SUM_OF_1000, "every node's value, under its new name");
    assert_eq!(client.request("GROW 1"), "GREW 1001");
}

/// In a memory capped at 6 MiB, a heap of 60,000 elements has no room for
/// a second copy: `malloc` fails in the middle of the conversion, after
/// many objects were allocated and pointers rewritten. The update rolls
/// back with no C code involved, from a copy of only what converting
/// writes (the allocator's bytes and the rewritten pointers): memory is as
/// it was, byte for byte, and the old allocator serves on.
#[test]
fn a_conversion_that_runs_out_of_memory_rolls_back_the_allocator_exactly() {
    let control = Control::new("heap-oom");
    let (server, first) = Server::start(&guest("heapsmall"), &["--control", &control.path()], &[]);
    assert_eq!(first.trim(), "heapgraph: listening");
    let mut client = server.client();
    assert_eq!(client.request("GROW 60000"), "GREW 60000");
    let sum = client.request("SUM");
    let idle = control.checkpoint("before");
    let reason = expect_error(&control.update(&guest("heapsmall-v2")), 1);
    assert!(reason.contains("rolled back") && reason.contains("`malloc(") && reason.contains("failed while converting"), "{reason}");
    let rolled_back = control.checkpoint("after");
    let first_difference = idle.memory.iter().zip(&rolled_back.memory).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "memory differs after the rollback");
    assert_eq!(rolled_back.globals, idle.globals);
    assert_eq!(client.request("SUM"), sum);
    assert_eq!(client.request("GROW 10"), "GREW 60010", "the allocator works on");
    assert_eq!(control.running_version(), sha256_file(&guest("heapsmall")));
}

/// An update reserves fresh memory right above the heap; the heap then
/// grows past it, and the allocator takes the pages beyond as a second
/// segment. A later update converts the objects of both segments.
#[test]
fn objects_in_a_second_heap_segment_are_converted_too() {
    let (_server, control, mut client) = start_graph("heapgraph", "heap-segments");
    // The same module again: nothing on the heap changes, but its
    // constant data is placed in fresh memory above the heap.
    let report = expect_report(&control.update(&guest("heapgraph")));
    assert_eq!(report.count("heap", "objects converted"), 0, "{report:?}");
    assert_eq!(client.request("GROW 20000"), "GREW 21000");
    let sum = client.request("SUM");
    let report = expect_report(&control.update(&guest("heapgraph-v2")));
    assert_eq!(report.count("heap", "objects converted"), 42001, "{report:?}");
    assert_eq!(client.request("SUM"), sum);
    assert_eq!(client.request("FRESH"), "FRESH nodes=21000 trees=21000 recs=21000");
}
