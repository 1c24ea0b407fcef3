//! The planner on the example KV server's version chain: what it keeps,
//! adds, converts and refuses, read from the real modules.

mod support;

use std::sync::Arc;

use upstare_patchgen::plan::{plan, DataFate};
use upstare_patchgen::version::Version;

fn kv(version: u32) -> Arc<Vec<u8>> {
    let flag = format!("-DKV_VERSION={version}");
    Arc::new(support::build_example("kv-server", &format!("plan-kv-v{version}"), &[&flag]))
}

fn fate<'a>(plan: &'a upstare_patchgen::plan::Plan, name: &str) -> &'a DataFate {
    &plan.data.iter().find(|d| d.key.name == name).unwrap_or_else(|| panic!("no data object {name}")).fate
}

#[test]
fn kv_chain_keeps_state_in_place_adds_and_converts() {
    let (v1, v2, v3) = (kv(1), kv(2), kv(3));
    let running = Arc::new(Version::initial(v1.clone()).unwrap());
    let p = plan(running.clone(), v2.clone()).unwrap();
    assert!(p.is_safe(), "{:?}", p.refusals);
    // The store pointer stays where v1 has it, so every pointer to it holds.
    let nconns = running.info.symbols.iter().position(|s| s.name.as_deref() == Some("nconns")).unwrap() as u32;
    assert_eq!(fate(&p, "nconns"), &DataFate::Kept { address: running.layout.data[&nconns] });
    assert!(matches!(fate(&p, "stats"), DataFate::Added { .. }));
    assert!(p.functions.added.iter().any(|f| f == "reply_stats"));
    assert!(p.functions.changed.iter().any(|f| f == "handle_line"));
    assert!(!p.functions.changed.iter().any(|f| f == "table_set"), "an untouched function counts as changed");

    // v2 placed, then v3: the struct grows a field in the middle.
    let base = 16 << 20;
    let v2_running = Arc::new(p.link(base).unwrap().version);
    let p = plan(v2_running, v3).unwrap();
    assert!(p.is_safe(), "{:?}", p.refusals);
    match fate(&p, "stats") {
        DataFate::Converted { map, transformer: None, .. } => {
            assert_eq!(map.zeroed, vec!["stats.bytes_in".to_string()]);
            assert!(map.dropped.is_empty());
            // requests stays first; wakeups moves past the new field.
            assert_eq!(map.copies.len(), 2, "{:?}", map.copies);
        }
        other => panic!("stats should be converted, not {other:?}"),
    }
}

#[test]
fn a_field_changing_type_is_refused_with_its_path() {
    let running = Arc::new(Version::initial(kv(2)).unwrap());
    let p = plan(running, kv(4)).unwrap();
    assert!(!p.is_safe());
    assert!(p.refusals.iter().any(|r| r.contains("stats.requests") && r.contains("char*")), "{:?}", p.refusals);
}

/// Two versions of a small program built from `source` with `-DV=1` and
/// `-DV=2`: the first running, the second planned against it.
fn plan_pair(name: &str, source: &str) -> upstare_patchgen::plan::Plan {
    let v1 = support::build_c(&format!("{name}-v1"), source, &["-DV=1"]);
    let v2 = support::build_c(&format!("{name}-v2"), source, &["-DV=2"]);
    plan(Arc::new(Version::initial(Arc::new(v1)).unwrap()), Arc::new(v2)).unwrap()
}

/// Every symbol inside an object the plan keeps lands, once placed, at
/// the same offset from the object's running address; and the kept objects
/// are where the old version's symbols of the same names run.
fn assert_kept_symbols_stay(p: &upstare_patchgen::plan::Plan) {
    let linked = p.link(16 << 20).unwrap();
    for d in &p.data {
        let DataFate::Kept { address } = d.fate else { continue };
        let old = p.old.info.symbols.iter().position(|s| s.data().is_some() && s.name.as_deref() == Some(d.key.name.as_str()));
        if let (Some(old), None) = (old, &d.key.unit) {
            assert_eq!(p.old.layout.data[&(old as u32)], address, "{} is kept where it runs", d.key);
        }
        let c = p.new.info.symbols[d.symbol as usize].data().unwrap();
        for (i, symbol) in p.new.info.symbols.iter().enumerate() {
            let Some(def) = symbol.data() else { continue };
            if def.segment == c.segment && def.address >= c.address && def.address < c.address + d.size.max(1) {
                let name = symbol.name.clone().unwrap_or_default();
                assert_eq!(linked.version.layout.data[&(i as u32)], address + (def.address - c.address), "{name} in {}", d.key);
            }
        }
    }
}

/// wasm-ld puts `.data` right after `.rodata`, so the first object of
/// `.data` (here stdio's `__stdout_FILE`) starts at the address one past
/// the read-only data. The read-only data moves to fresh memory; that
/// object must not move with it (it did: the program's `stdout` then
/// pointed at a zeroed copy, and its first `printf` trapped).
#[test]
fn the_object_right_after_the_read_only_data_stays_in_place() {
    const SOURCE: &str = r#"
#include <stdio.h>
int main(void) { printf("v%d\n", V); return 0; }
"#;
    let p = plan_pair("after-rodata", SOURCE);
    assert!(p.is_safe(), "{:?}", p.refusals);
    let stdout_file = p.new.info.symbol_named("__stdout_FILE").unwrap();
    let def = p.new.info.symbols[stdout_file].data().unwrap();
    let rodata = p.new.info.segments.iter().find(|s| !s.writable).unwrap();
    assert_eq!(def.address, rodata.address + rodata.size, "the case this test is about: .data starts where .rodata ends");
    assert_kept_symbols_stay(&p);
}

/// The new version adds a second name for an object the old one has: the
/// object is the same, kept in place, under whichever name.
#[test]
fn an_alias_added_by_the_new_version_keeps_its_object_in_place() {
    const SOURCE: &str = r#"
int counter = 5;
#if V == 2
extern int tally __attribute__((alias("counter")));
#define COUNT tally
#else
#define COUNT counter
#endif
int main(void) { return ++COUNT; }
"#;
    let p = plan_pair("alias", SOURCE);
    assert!(p.is_safe(), "{:?}", p.refusals);
    let kept: Vec<_> = p.data.iter().filter(|d| matches!(d.fate, DataFate::Kept { .. })).map(|d| d.key.name.as_str()).collect();
    assert!(kept.contains(&"counter") || kept.contains(&"tally"), "kept: {kept:?}");
    assert!(p.data.iter().all(|d| !matches!(d.fate, DataFate::Added { .. })), "nothing is new: {:?}", p.data);
    assert!(p.removed.is_empty(), "{:?}", p.removed);
    assert_kept_symbols_stay(&p);
}
