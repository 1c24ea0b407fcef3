//! The frame mapper on real C guests: for each rule of
//! `patchgen/src/frames.rs`, a pair of versions built by the real toolchain
//! and the exact recipe (which new local takes which old local) or the exact
//! reason a frame cannot move.

mod support;

use std::sync::Arc;

use upstare_instrument::abi::{Metadata, ResumeKind, TypedFrame, Value};
use upstare_patchgen::frames::{describe, FrameMapper, FramePlan, Recipe, Unmappable};
use upstare_patchgen::plan::plan;
use upstare_patchgen::version::Version;

/// Two versions of a program, planned and placed as the host does, with
/// the frame plan for every resume point of the first.
struct Pair {
    old: Arc<Version>,
    old_meta: Metadata,
    frames: FramePlan,
}

fn metadata(wasm: &[u8]) -> Metadata {
    upstare_instrument::instrument(wasm, &Default::default()).expect("instrumentable").metadata
}

fn pair(name: &str, v1: &str, v2: &str) -> Pair {
    let old = Arc::new(Version::initial(Arc::new(support::build_c(&format!("{name}-v1"), v1, &[]))).unwrap());
    let new = Arc::new(support::build_c(&format!("{name}-v2"), v2, &[]));
    let p = plan(old.clone(), new).unwrap();
    // Fresh data far above anything the old version uses, as the host places it.
    let linked = p.link(64 << 20).unwrap();
    let (old_meta, new_meta) = (metadata(&old.wasm), metadata(&linked.wasm));
    let frames = FrameMapper { old: (&old, &old_meta), new: (&linked.version, &new_meta), functions: &p.functions }.plan();
    Pair { old, old_meta, frames }
}

impl Pair {
    fn func(&self, name: &str) -> u32 {
        self.old.info.functions.iter().position(|f| f.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no {name}"))
            as u32
    }

    /// The recipe of `function`'s resume point described as `point`
    /// ("call to step #0", "loop #1", "entry", "indirect call #0").
    fn recipe(&self, function: &str, point: &str) -> &Result<Recipe, Unmappable> {
        let func = self.func(function);
        let meta = self.old_meta.function(func).unwrap_or_else(|| panic!("{function} has no update points"));
        let points: Vec<String> = meta.resume_points.iter().map(|rp| describe(&self.old, rp)).collect();
        let index = points.iter().position(|p| p == point).unwrap_or_else(|| panic!("{function} has no {point}: {points:?}"));
        self.frames.recipe(func, index as u32).expect("every point has a recipe or a reason")
    }

    fn refusal(&self, function: &str, point: &str) -> String {
        match self.recipe(function, point) {
            Err(e) => e.reason.clone(),
            Ok(r) => panic!("{function} at {point} moves: {r:?}"),
        }
    }

    fn moves(&self, function: &str, point: &str) -> &Recipe {
        match self.recipe(function, point) {
            Ok(r) => r,
            Err(e) => panic!("{function} at {point} cannot move: {e}"),
        }
    }
}

/// A leaf with a loop (so calls to it are resume points), called from a
/// loop in `main`; `change` is spliced into that loop after the call,
/// `extra` before `main`. [`program_ending`] changes `main` after its loop.
fn program(change: &str, extra: &str) -> String {
    program_ending(change, extra, "%d")
}

fn program_ending(change: &str, extra: &str, format: &str) -> String {
    format!(
        r#"
#include <stdio.h>
volatile int sink;
__attribute__((noinline)) int step(int n) {{
    int s = 0;
    for (int i = 0; i < n; i++) {{ s += i * i; sink = s; }}
    return s;
}}
{extra}
int main(int argc, char **argv) {{
    (void)argv;
    int acc = 0;
    for (int i = 0; i < 100 + argc; i++) {{
        acc += step(i);
        {change}
    }}
    printf("{format}\n", acc);
    return 0;
}}
"#
    )
}

#[test]
fn an_unchanged_function_moves_verbatim() {
    let p = pair("frames-same", &program("", ""), &program("acc ^= 3;", ""));
    let r = p.moves("step", "loop #0");
    let n = p.old_meta.function(p.func("step")).unwrap().locals.len() as u32;
    assert_eq!(r.locals, (0..n).map(Some).collect::<Vec<_>>(), "every local copied to itself");
}

/// `main` changes after its loop: the code up to the call and the whole
/// loop around it are the same in both versions, so every value live at
/// the call means the same and stays in its local.
#[test]
fn a_changed_function_moves_where_the_code_up_to_the_point_and_its_loop_are_the_same() {
    let p = pair("frames-prefix", &program("", ""), &program_ending("", "", "total %d"));
    let r = p.moves("main", "call to step #0");
    for (new, source) in r.locals.iter().enumerate() {
        assert!(source.is_none_or(|old| old as usize == new), "local {new} from {source:?}: {r:?}");
    }
    assert!(r.locals.iter().any(Option::is_some), "some locals are live across the call: {r:?}");
}

/// `main` changes inside the loop, after the call: the loop carries values
/// from changed code back to the call, so a compiler temporary it writes
/// after the call cannot be trusted: refused, naming it.
#[test]
fn a_loop_that_reaches_changed_code_refuses_the_temporaries_it_writes() {
    let p = pair("frames-escape", &program("", ""), &program("acc ^= 3;", ""));
    let reason = p.refusal("main", "call to step #0");
    assert!(
        reason.starts_with("local ") && reason.ends_with(" (a compiler temporary) is live there and has no counterpart in the old frame"),
        "{reason}"
    );
}

#[test]
fn a_point_whose_count_changed_is_refused() {
    let p = pair("frames-count", &program("", ""), &program("acc += step(acc & 7);", ""));
    assert_eq!(
        p.refusal("main", "call to step #0"),
        "the function has 1 such points in the old version and 2 in the new one"
    );
}

#[test]
fn a_function_the_new_version_lacks_is_refused() {
    let helper = "__attribute__((noinline)) int helper(int n) { int s = 1; for (int i = 0; i < n; i++) { s *= 3; sink = s; } return s; }";
    let v1 = program("acc += helper(acc & 3);", helper);
    let p = pair("frames-removed", &v1, &program("", ""));
    assert_eq!(p.refusal("helper", "loop #0"), "the new version has no function of that name");
    // The plan's counts cover every resume point of the old version, the
    // moving ones and the refused ones.
    let points: usize = p.old_meta.functions.iter().map(|f| f.resume_points.len()).sum();
    let (moving, refused) = p.frames.counts();
    assert_eq!(moving + refused, points);
    assert!(moving > 0 && refused > 0, "{moving} moving, {refused} refused");
    let step = p.func("step");
    let step_points = p.old_meta.function(step).unwrap().resume_points.len();
    assert!(moving >= step_points, "step is unchanged, so all its points move");
}

/// Recursion without loops: the entry of a function on a call cycle is an
/// update point, and a frame there keeps only its parameters.
#[test]
fn a_frame_at_entry_keeps_its_parameters_and_refuses_new_ones() {
    let rec = |body: &str, params: &str, call: &str| {
        format!(
            r#"
#include <stdio.h>
__attribute__((noinline)) int rec({params}) {{ {body} }}
int main(int argc, char **argv) {{ (void)argv; printf("%d\n", rec({call})); return 0; }}
"#
        )
    };
    let v1 = rec("return n <= 1 ? 1 : n * rec(n - 1) % 1000003;", "int n", "argc + 20");
    let same = rec("return n <= 1 ? 2 : n * rec(n - 1) % 1000003;", "int n", "argc + 20");
    let p = pair("frames-entry", &v1, &same);
    let r = p.moves("rec", "entry");
    assert_eq!(r.locals.first(), Some(&Some(0)), "the parameter is copied: {r:?}");
    assert!(r.locals.iter().skip(1).all(Option::is_none), "the other locals start at zero: {r:?}");

    let more = rec("return n <= 1 ? k : n * rec(n - 1, k) % 1000003;", "int n, int k", "argc + 20, 1");
    let p = pair("frames-entry-params", &v1, &more);
    assert_eq!(p.refusal("rec", "entry"), "its parameters changed");
    // As many parameters, of another type: the saved bits would be read
    // as something else.
    let wider = rec("return n <= 1 ? 1 : (int)(n * rec(n - 1) % 1000003);", "long long n", "argc + 20");
    let p = pair("frames-entry-types", &v1, &wider);
    assert_eq!(p.refusal("rec", "entry"), "its parameters changed");
}

#[test]
fn an_indirect_call_moves_by_signature() {
    let extra = "int (*volatile op)(int) = step;";
    let v1 = program("acc += op(i & 15);", extra);
    let v2 = program_ending("acc += op(i & 15);", extra, "total %d");
    let p = pair("frames-indirect", &v1, &v2);
    p.moves("main", "indirect call #0");
    let other = "long long wide(long long n) { long long s = 0; for (long long i = 0; i < n; i++) { s += i; sink = (int)s; } return s; }\nlong long (*volatile op)(long long) = wide;";
    let v3 = program("acc += (int)op(i & 15);", other);
    let p = pair("frames-indirect-type", &v1, &v3);
    assert_eq!(p.refusal("main", "indirect call #0"), "the function has 1 such points in the old version and 0 in the new one");
}

/// The host's pause applies recipes: a frame that does not hold what its
/// recipe reads is refused, never filled with zeros.
#[test]
fn a_frame_that_lacks_a_local_its_recipe_reads_is_refused() {
    let p = pair("frames-short", &program("", ""), &program("acc ^= 3;", ""));
    let func = p.func("step");
    let meta = p.old_meta.function(func).unwrap();
    let rp = meta.resume_points.iter().position(|rp| rp.kind == ResumeKind::Loop).unwrap() as u32;
    let full = TypedFrame {
        func,
        resume_point: rp,
        locals: meta.locals.iter().map(|t| Value::from_slot(*t, 7)).collect(),
        operands: Vec::new(),
    };
    let moved = p.frames.map(&full).expect("a whole frame moves");
    assert_eq!(moved.locals, full.locals, "step is unchanged");
    let mut short = full.clone();
    short.locals.pop();
    let err = p.frames.map(&short).unwrap_err();
    assert!(err.reason.starts_with("the saved frame has no "), "{err}");
    let unknown = TypedFrame { resume_point: 999, ..full };
    assert_eq!(
        p.frames.map(&unknown).unwrap_err().reason,
        "the frame names a resume point the running version's metadata does not have"
    );
}

/// The example server's main waits in poll(); v8 computes what it polls
/// differently before the call, so a compiler temporary live across it
/// means something else: refused, naming it. v2 -> v3 moves it.
#[test]
fn a_live_temporary_without_a_counterpart_is_refused() {
    let kv = |v: u32| support::build_example("kv-server", &format!("frames-kv-v{v}"), &[&format!("-DKV_VERSION={v}")]);
    let old = Arc::new(Version::initial(Arc::new(kv(2))).unwrap());
    let old_meta = metadata(&old.wasm);
    for (v, expect_ok) in [(3, true), (8, false)] {
        let p = plan(old.clone(), Arc::new(kv(v))).unwrap();
        let linked = p.link(64 << 20).unwrap();
        let new_meta = metadata(&linked.wasm);
        let frames = FrameMapper { old: (&old, &old_meta), new: (&linked.version, &new_meta), functions: &p.functions }.plan();
        let pair = Pair { old: old.clone(), old_meta: old_meta.clone(), frames };
        match pair.recipe("main", "call to poll #0") {
            Ok(_) => assert!(expect_ok, "v2 -> v{v}: main moves"),
            Err(e) => {
                assert!(!expect_ok, "v2 -> v{v}: {e}");
                assert!(
                    e.reason.starts_with("local ") && e.reason.ends_with("is live there and has no counterpart in the old frame"),
                    "{e}"
                );
            }
        }
    }
}
