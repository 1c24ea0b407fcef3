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
