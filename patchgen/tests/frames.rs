//! The frame mapper on real C guests: for each rule of
//! `patchgen/src/frames.rs`, a pair of versions built by the real toolchain
//! and the exact recipe (which new local takes which old local) or the exact
//! reason a frame cannot move.

mod support;

use std::sync::Arc;

use upstare_instrument::abi::{Metadata, ResumeKind, TypedFrame, Value};
use Source::{Dead, Fresh, Old};
use upstare_patchgen::frames::{describe, FrameMapper, FramePlan, Recipe, Source, Unmappable};
use upstare_patchgen::plan::plan;
use upstare_patchgen::version::Version;

/// Two versions of a program, planned and placed as the host does, with
/// the frame plan for every resume point of the first.
struct Pair {
    old: Arc<Version>,
    old_meta: Metadata,
    /// The new version as relinked, and its metadata.
    new: Version,
    new_meta: Metadata,
    /// The names of the functions whose code changed.
    changed: Vec<String>,
    frames: FramePlan,
}

fn metadata(wasm: &[u8]) -> Metadata {
    upstare_instrument::instrument(wasm, &Default::default()).expect("instrumentable").metadata
}

fn pair(name: &str, v1: &str, v2: &str) -> Pair {
    pair_with(name, v1, v2, &[])
}

/// [`pair`] with extra compiler flags for both versions (`-g0`: no DWARF).
fn pair_with(name: &str, v1: &str, v2: &str, flags: &[&str]) -> Pair {
    let old = Arc::new(Version::initial(Arc::new(support::build_c(&format!("{name}-v1"), v1, flags))).unwrap());
    let new = Arc::new(support::build_c(&format!("{name}-v2"), v2, flags));
    let p = plan(old.clone(), new).unwrap();
    // Fresh data far above anything the old version uses, as the host places it.
    let linked = p.link(64 << 20).unwrap();
    let (old_meta, new_meta) = (metadata(&old.wasm), metadata(&linked.wasm));
    let frames = FrameMapper { old: (&old, &old_meta), new: (&linked.version, &new_meta), functions: &p.functions, identical_code_rule: true }.plan();
    Pair { old, old_meta, new: linked.version, new_meta, changed: p.functions.changed.clone(), frames }
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
            Ok(r) => {
                assert_eq!(r.locals.len(), r.types.len(), "a type for every local");
                r
            }
            Err(e) => panic!("{function} at {point} cannot move: {e}"),
        }
    }

    /// Where each new local at `function`'s `point` comes from.
    fn sources(&self, function: &str, point: &str) -> &[Source] {
        &self.moves(function, point).locals
    }

    /// `function`'s frame at `point`, with the given local values for the
    /// locals it saves.
    fn frame(&self, function: &str, point: &str, locals: Vec<Value>) -> TypedFrame {
        let func = self.func(function);
        let meta = self.old_meta.function(func).unwrap();
        let resume_point = meta.resume_points.iter().position(|rp| describe(&self.old, rp) == point).unwrap() as u32;
        saved_frame(meta, resume_point, locals)
    }
}

/// A frame of `meta`'s function at `resume_point` holding, of `locals`,
/// those the point saves.
fn saved_frame(meta: &upstare_instrument::abi::FunctionMeta, resume_point: u32, locals: Vec<Value>) -> TypedFrame {
    let rp = &meta.resume_points[resume_point as usize];
    let locals = locals.into_iter().enumerate().map(|(i, v)| rp.locals.contains(&(i as u32)).then_some(v)).collect();
    TypedFrame { func: meta.index, resume_point, locals, slots: rp.slots.clone(), operands: Vec::new() }
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
    assert_eq!(r.locals, (0..n).map(Old).collect::<Vec<_>>(), "every local copied to itself");
}

/// `main` changes after its loop: the code up to the call and the whole
/// loop around it are the same in both versions, so every value live at
/// the call means the same and stays in its local.
#[test]
fn a_changed_function_moves_where_the_code_up_to_the_point_and_its_loop_are_the_same() {
    let p = pair("frames-prefix", &program("", ""), &program_ending("", "", "total %d"));
    let r = p.moves("main", "call to step #0");
    for (new, source) in r.locals.iter().enumerate() {
        assert!(matches!(source, Dead) || *source == Old(new as u32), "local {new} from {source:?}: {r:?}");
    }
    assert!(r.locals.iter().any(|s| matches!(s, Old(_))), "some locals are live across the call: {r:?}");
}

/// `main` changes inside the loop, after the call: the loop carries values
/// from changed code back to the call, so a compiler temporary it writes
/// after the call cannot be trusted: refused, naming it.
#[test]
fn a_loop_that_reaches_changed_code_refuses_the_temporaries_it_writes() {
    let p = pair("frames-escape", &program("", ""), &program("acc ^= 3;", ""));
    let reason = p.refusal("main", "call to step #0");
    assert!(
        reason.starts_with("local ") && reason.contains(" (a compiler temporary) is live there and has no counterpart in the old frame: "),
        "{reason}"
    );
}

/// A second call to `step` in the loop: the old call is found by its
/// place in the code, not by counting calls, and what stops the frame is
/// the temporary the changed loop writes, named.
#[test]
fn a_point_is_found_by_its_place_in_the_code_when_the_count_changed() {
    let p = pair("frames-count", &program("", ""), &program("acc += step(acc & 7);", ""));
    let reason = p.refusal("main", "call to step #0");
    assert!(
        reason.starts_with("local ") && reason.contains(" (a compiler temporary) is live there and has no counterpart in the old frame: "),
        "{reason}"
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
    assert_eq!(r.locals.first(), Some(&Old(0)), "the parameter is copied: {r:?}");
    assert!(r.locals.iter().skip(1).all(|s| *s == Fresh), "the other locals start at zero: {r:?}");
    // The entry point's offset is the body's local declarations, not an
    // instruction: the function's other points are analysed all the same.
    let call = p.recipe("rec", "call to rec #0");
    assert!(!format!("{call:?}").contains("cannot analyse"), "{call:?}");

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
    let full = saved_frame(meta, rp, meta.locals.iter().map(|t| Value::from_slot(*t, 7)).collect());
    let moved = p.frames.map(&full).expect("a whole frame moves");
    assert_eq!(moved.locals, full.locals, "step is unchanged");
    let mut short = full.clone();
    let last = *full.slots.last().expect("the loop header saves a local");
    short.locals[last as usize] = None;
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
        let frames = FrameMapper { old: (&old, &old_meta), new: (&linked.version, &new_meta), functions: &p.functions, identical_code_rule: true }.plan();
        let changed = p.functions.changed.clone();
        let pair = Pair { old: old.clone(), old_meta: old_meta.clone(), new: linked.version, new_meta, changed, frames };
        match pair.recipe("main", "call to poll #0") {
            Ok(_) => assert!(expect_ok, "v2 -> v{v}: main moves"),
            Err(e) => {
                assert!(!expect_ok, "v2 -> v{v}: {e}");
                assert!(
                    e.reason.starts_with("local ") && e.reason.contains("is live there and has no counterpart in the old frame: "),
                    "{e}"
                );
            }
        }
    }
}

/// Parameters: `b` is never assigned, `c` is, and the code before every
/// call changes, so without DWARF only the parameter rule moves values.
const PARAMS_V1: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int step(int x) { printf("%d\n", x); return x * 3 + 1; }
__attribute__((noinline)) int keep(int a, int b) { int x = step(a + 1); return x + b; }
__attribute__((noinline)) int clobber(int a, int c) {
    while (c > 0) c = step(c + a) - 100;
    return c;
}
typedef int (*fn)(int);
__attribute__((noinline)) int indirect(fn f, int a, int b) { int x = f(a * 2); return x - b; }
int main(int argc, char **argv) {
    fn f = argc > 5 ? 0 : step;
    printf("%d %d %d\n", keep(argc, argc + 1), clobber(argc, argc * 3), indirect(f, argc, 2));
    return 0;
}
"#;

const PARAMS_V2: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int step(int x) { printf("%d\n", x); return x * 3 + 1; }
__attribute__((noinline)) int keep(int a, int b) { int x = step(a * 3); return x + b; }
__attribute__((noinline)) int clobber(int a, int c) {
    while (c > 0) c = step(c * a) - 100;
    return c;
}
typedef int (*fn)(int);
__attribute__((noinline)) int indirect(fn f, int a, int b) { int x = f(a * 4); return x - b; }
int main(int argc, char **argv) {
    fn f = argc > 5 ? 0 : step;
    printf("%d %d %d\n", keep(argc, argc + 1), clobber(argc, argc * 3), indirect(f, argc, 2));
    return 0;
}
"#;

#[test]
fn parameters_never_assigned_are_copied_and_assigned_ones_are_not() {
    let p = pair_with("frames-params", PARAMS_V1, PARAMS_V2, &["-g0"]);
    assert!(["keep", "clobber", "indirect"].iter().all(|f| p.changed.iter().any(|c| c == f)), "{:?}", p.changed);
    assert_eq!(p.sources("keep", "call to step #0"), [Old(0), Old(1)]);
    assert_eq!(p.sources("indirect", "indirect call #0"), [Old(0), Old(1), Old(2)]);
    // `c` (local 1) is assigned in the loop and read at its header.
    assert_eq!(
        p.refusal("clobber", "loop #0"),
        "local 1 (a compiler temporary) is live there and has no counterpart in the old frame: the new version computes it otherwise than the old one computed local 1 (code only the new version has writes it, or writes it from other values)"
    );
    // Right after the call `c` is written before any read: dead, so
    // neither frame saves it, and mapping a frame carries only the live
    // local.
    assert_eq!(p.sources("clobber", "call to step #0"), [Old(0), Dead, Dead]);
    let frame = p.frame("clobber", "call to step #0", vec![Value::I32(11), Value::I32(22), Value::I32(33)]);
    assert_eq!(frame.locals, [Some(Value::I32(11)), None, None], "the old frame saves only the live local");
    assert_eq!(p.frames.map(&frame).unwrap().locals, [Some(Value::I32(11)), None, None]);
}

/// `framed` keeps its buffer in linear memory; the code before its call
/// changed. `grown` doubles its buffer.
const FRAME_V1: &str = r#"
#include <stdio.h>
#include <string.h>
__attribute__((noinline)) int fill(char *p, int n) { memset(p, 'a', n); printf("%s\n", p); return n; }
__attribute__((noinline)) int framed(int n) { char buf[32]; buf[n & 15] = 0; int r = fill(buf, n & 15); return r + buf[0]; }
__attribute__((noinline)) int grown(int n) { char buf[32]; buf[n & 15] = 0; int r = fill(buf, n & 15); return r + buf[1]; }
int main(int argc, char **argv) { (void)argv; printf("%d %d\n", framed(argc), grown(argc)); return 0; }
"#;

const FRAME_V2: &str = r#"
#include <stdio.h>
#include <string.h>
__attribute__((noinline)) int fill(char *p, int n) { memset(p, 'a', n); printf("%s\n", p); return n; }
__attribute__((noinline)) int framed(int n) { char buf[32]; buf[n & 7] = 0; int r = fill(buf, n & 7); return r + buf[0]; }
__attribute__((noinline)) int grown(int n) { char buf[64]; buf[n & 15] = 0; int r = fill(buf, n & 15); return r + buf[1]; }
int main(int argc, char **argv) { (void)argv; printf("%d %d\n", framed(argc), grown(argc)); return 0; }
"#;

#[test]
fn the_frame_base_maps_to_the_old_frame_base_and_a_resized_array_is_refused() {
    // Local 1 holds the frame base: only DWARF's frame base moves it...
    let p = pair("frames-base", FRAME_V1, FRAME_V2);
    assert_eq!(p.sources("framed", "call to fill #0"), [Old(0), Old(1), Dead]);
    // The frame could be rebuilt, but its array changed type: its bytes
    // have no counterpart.
    assert_eq!(
        p.refusal("grown", "call to fill #0"),
        "its frame in linear memory changed (32 to 64 bytes) and cannot be rebuilt: variable `grown/buf` is in scope at the point and the old frame has no counterpart for it: its value there is unknown"
    );
    // `grown` alone cannot move.
    let (moving, refused) = p.frames.counts();
    assert_eq!(refused, 1, "{moving} moving");
    // ...and without DWARF, the code does: the prologue that computes the
    // base pairs with the new one's.
    let p = pair_with("frames-base-g0", FRAME_V1, FRAME_V2, &["-g0"]);
    assert_eq!(p.sources("framed", "call to fill #0")[1], Old(1));
}

/// `same` and `differs` both keep `t` in a compiler temporary across their
/// call; `same`'s new version computes it as before (only the call's
/// argument changed), `differs`'s computes it from another constant.
const TEMPS_V1: &str = r#"
#include <stdio.h>
volatile int sink;
__attribute__((noinline)) int step(int x) { printf("%d\n", x); return x * 3 + 1; }
__attribute__((noinline)) int same(int a) { int t = a * 7 + 3; sink = t; int x = step(a); return x + t; }
__attribute__((noinline)) int differs(int a) { int t = a * 7 + 3; sink = t; int x = step(a); return x + t; }
int main(int argc, char **argv) { (void)argv; printf("%d %d\n", same(argc), differs(argc)); return 0; }
"#;

const TEMPS_V2: &str = r#"
#include <stdio.h>
volatile int sink;
__attribute__((noinline)) int step(int x) { printf("%d\n", x); return x * 3 + 1; }
__attribute__((noinline)) int same(int a) { int t = a * 7 + 3; sink = t; int x = step(a + 1); return x + t; }
__attribute__((noinline)) int differs(int a) { int t = a * 5 + 3; sink = t; int x = step(a); return x + t; }
int main(int argc, char **argv) { (void)argv; printf("%d %d\n", same(argc), differs(argc)); return 0; }
"#;

#[test]
fn a_temporary_computed_the_same_way_moves_and_one_computed_otherwise_is_refused() {
    // No DWARF, and the code before each call changed: only the pairing of
    // the two versions' instructions can vouch for `t`.
    let p = pair_with("frames-temps", TEMPS_V1, TEMPS_V2, &["-g0"]);
    assert!(["same", "differs"].iter().all(|f| p.changed.iter().any(|c| c == f)), "{:?}", p.changed);
    let sources = p.sources("same", "call to step #0");
    assert!(sources.iter().filter(|s| matches!(s, Old(_))).count() >= 1, "{sources:?}");
    let refusal = p.refusal("differs", "call to step #0");
    assert!(refusal.starts_with("local ") && refusal.contains("(a compiler temporary) is live there and has no counterpart in the old frame: the new version computes it otherwise"), "{refusal}");
}

#[test]
fn saved_operands_of_other_types_are_refused() {
    let wide = |expr: &str| {
        format!(
            r#"
#include <stdio.h>
__attribute__((noinline)) int step(int x) {{ printf("%d\n", x); return x * 3 + 1; }}
__attribute__((noinline)) long long wide(long long d, int n) {{ return {expr} * 3 + step(n); }}
int main(int argc, char **argv) {{ (void)argv; printf("%lld\n", wide(argc, argc)); return 0; }}
"#
        )
    };
    // The i64 product waits on the operand stack across the call; in the
    // new version an i32 does.
    let p = pair("frames-operands", &wide("d"), &wide("(int)d"));
    assert_eq!(p.refusal("wide", "call to step #0"), "the values on the operand stack there differ between the versions");
}

#[test]
fn call_points_match_only_the_same_callee_counted_alike() {
    let callees = |swapped: &str, added: &str| {
        format!(
            r#"
#include <stdio.h>
__attribute__((noinline)) int step(int x) {{ printf("%d\n", x); return x * 3 + 1; }}
__attribute__((noinline)) int other(int x) {{ printf("o%d\n", x); return x - 1; }}
__attribute__((noinline)) int swapped(int a) {{ return {swapped}(a) + 1; }}
__attribute__((noinline)) int added(int a) {{ int x = step(a); {added} return other(x) + x; }}
int main(int argc, char **argv) {{ (void)argv; printf("%d %d\n", swapped(argc), added(argc)); return 0; }}
"#
        )
    };
    let p = pair("frames-callees", &callees("step", ""), &callees("other", "x = step(x);"));
    // A call to another function is no counterpart, even the only call.
    assert_eq!(
        p.refusal("swapped", "call to step #0"),
        "the function has 1 such points in the old version and 0 in the new one"
    );
    // A second call to `step` after the first: the old call pairs with the
    // first one in the code, although there are two now.
    let r = p.moves("added", "call to step #0");
    let added = p.new.info.functions.iter().position(|f| f.name.as_deref() == Some("added")).unwrap() as u32;
    let first = &p.new_meta.function(added).unwrap().resume_points[r.resume_point as usize];
    assert_eq!(first.ordinal, 0, "{r:?}");
    assert_eq!(p.new.info.function_name(first.callee), "step");
}

/// `total` is computed differently before the call, so neither the
/// identical-prefix nor the parameter rule covers it: only DWARF, which
/// places the variable of that name and type in a local of each version
/// (stored before the call, so it is computed there, and read twice after
/// it, so it is not left on the operand stack).
fn named(init: &str) -> String {
    format!(
        r#"
#include <stdio.h>
volatile int sink;
__attribute__((noinline)) int step(int x) {{ printf("%d\n", x); return x * 3 + 1; }}
__attribute__((noinline)) int named(int n) {{ {init}; sink = (int)total; int r = step(n); return r > 3 ? r - (int)total : (int)total * r; }}
int main(int argc, char **argv) {{ (void)argv; printf("%d\n", named(argc)); return 0; }}
"#
    )
}

#[test]
fn a_named_variable_moves_to_the_local_dwarf_places_it_in_if_its_type_is_the_same() {
    let p = pair("frames-dwarf", &named("int total = n * 7 + sink"), &named("int total = n * 9 + sink"));
    let point = "call to step #0";
    // The local DWARF names `total` at the call, in each version.
    let total = |v: &Version, func: u32, meta: &Metadata| {
        let rp = meta.function(func).unwrap().resume_points.iter().find(|rp| describe(v, rp) == point).unwrap();
        let pc = rp.offset.wrapping_sub(meta.code_section);
        let vars = v.debug.variables_at(pc);
        let var = vars.iter().find(|var| var.key.name == "total").expect("DWARF places `total` at the call");
        match var.location {
            upstare_patchgen::dwarf::Location::Local(l) => l,
            other => panic!("`total` is not in a local: {other:?}"),
        }
    };
    let old_local = total(&p.old, p.func("named"), &p.old_meta);
    let r = p.moves("named", point);
    let new_local = total(&p.new, r.func, &p.new_meta);
    assert_eq!(r.locals[new_local as usize], Old(old_local), "{r:?}");

    // The same without DWARF: `total` is then a temporary nobody can vouch for.
    let p = pair_with("frames-dwarf-g0", &named("int total = n * 7 + sink"), &named("int total = n * 9 + sink"), &["-g0"]);
    assert!(p.refusal("named", point).contains("(a compiler temporary) is live there and has no counterpart in the old frame: "));

    // Another C type in the same wasm type: the bits would be read as
    // something else, so the variable has no counterpart.
    let p = pair("frames-dwarf-type", &named("int total = n * 7 + sink"), &named("unsigned total = n * 9u + sink"));
    let refusal = p.refusal("named", point);
    assert!(refusal.starts_with(&format!("local {new_local} (`total`) is live there and has no counterpart in the old frame: ")), "{refusal}");
}

/// Two buffers in linear memory; `first` names the one declared first,
/// which clang places nearer the frame's start.
fn buffers(first: &str, second: &str) -> String {
    format!(
        r#"
#include <stdio.h>
#include <string.h>
__attribute__((noinline)) int fill(char *p, int n) {{ memset(p, 'a', n); printf("%s\n", p); return n; }}
__attribute__((noinline)) int two(int n) {{
    char {first}[16], {second}[16];
    head[n & 7] = 0; tail[n & 3] = 0;
    int r = fill(head, n & 7);
    return r + fill(tail, n & 3);
}}
int main(int argc, char **argv) {{ (void)argv; printf("%d\n", two(argc)); return 0; }}
"#
    )
}

/// Linear memory for [`FramePlan::map_stack`]: 32-bit words by address.
struct Words(std::collections::HashMap<u32, u32>);

impl upstare_patchgen::rebuild::StackMemory for Words {
    fn read_u32(&self, address: u32) -> Option<u32> {
        Some(self.0.get(&address).copied().unwrap_or(0))
    }
}

#[test]
fn a_variable_moved_within_an_unchanged_frame_size_is_rebuilt_with_its_bytes_moved() {
    let p = pair("frames-moved", &buffers("head", "tail"), &buffers("tail", "head"));
    assert!(p.changed.iter().any(|f| f == "two"), "{:?}", p.changed);
    let recipe = p.moves("two", "call to fill #0");
    let layout = recipe.relayout.as_ref().expect("the frame is rebuilt");
    let (old_stack, new_stack) = layout.stack_at_point;
    assert_eq!(old_stack, new_stack, "the frame's size did not change");
    // The two buffers trade places, 16 bytes each.
    let place = |name: &str| layout.moves.iter().find(|(_, n)| n == name).unwrap_or_else(|| panic!("{name} moves")).0;
    let (head, tail) = (place("head"), place("tail"));
    assert_eq!((head.len, tail.len), (16, 16));
    assert_eq!((head.from, head.to), (tail.to, tail.from), "{layout:?}");
    assert_ne!(head.from, head.to);
    // The frame base is computed again from the entry stack pointer.
    assert!(recipe.locals.iter().any(|s| matches!(s, Source::Stack(_))), "{:?}", recipe.locals);

    // Rebuilt in a stack with nothing above it: the bytes move, nothing
    // else does, and the frame base is where the new code puts it.
    let upstare_patchgen::retreat::EntryStackPointer::Local { local, offset } = layout.entry else {
        panic!("the entry stack pointer is kept in a local: {:?}", layout.entry)
    };
    let entry = 0x10000u32;
    let sp = (i64::from(entry) + old_stack) as u32;
    let old_types = &p.old_meta.function(p.func("two")).unwrap().locals;
    let mut locals: Vec<Value> = old_types.iter().map(|t| Value::from_slot(*t, 0)).collect();
    locals[local as usize] = Value::I32((i64::from(entry) + offset) as i32);
    let frame = p.frame("two", "call to fill #0", locals);
    let stack = p.frames.map_stack(&[frame], sp, &Words(Default::default())).expect("rebuilt");
    assert_eq!(stack.rebuilt.as_ref().map(|r| (r.frame.as_str(), r.frames, r.stack_from)), Some(("two", 1, entry)));
    assert_eq!(stack.stack_pointer, Some(sp));
    let at = |o: i64| (i64::from(entry) + o) as u32;
    let mut moves = stack.moves.clone();
    moves.sort();
    let mut expected = vec![(at(head.from), at(head.to), 16), (at(tail.from), at(tail.to), 16)];
    expected.sort();
    assert_eq!(moves, expected);
    assert!(stack.patches.is_empty());
}

/// `edge` keeps `t` in a local across the call; `after` is the expression
/// right after the call, `first` the call before it.
fn edge(first: &str, after: &str) -> String {
    format!(
        r#"
#include <stdio.h>
volatile int sink;
__attribute__((noinline)) int step(int x) {{ printf("%d\n", x); return x * 3 + 1; }}
__attribute__((noinline)) int one(int x) {{ return x * 5 + sink; }}
__attribute__((noinline)) int other(int x) {{ return x * 5 + sink; }}
__attribute__((noinline)) int edge(int n) {{ int t = {first}(n) * 7 + sink; sink = t; int r = step(n) {after}; return r > 3 ? r - t : t * r; }}
int main(int argc, char **argv) {{ (void)argv; printf("%d\n", edge(argc)); return 0; }}
"#
    )
}

/// Without DWARF, the identical-prefix rule alone keeps `t`: it holds
/// through the call's last byte, and no further.
#[test]
fn the_identical_prefix_ends_exactly_at_the_first_difference() {
    // The first instruction after the call differs: the prefix covers the
    // call, so `t` moves.
    let p = pair_with("frames-edge", &edge("one", "+ t"), &edge("one", "^ 3"), &["-g0"]);
    assert!(p.changed.iter().any(|f| f == "edge"));
    let r = p.moves("edge", "call to step #0");
    assert!(r.locals.contains(&Old(1)), "t keeps its local: {r:?}");
    // The two versions differ only in which function the first call names:
    // the bytes are the same (the callee's index is a relocated field), so
    // only the relocation tells that `t` was computed differently.
    let p = pair_with("frames-edge-reloc", &edge("one", "+ t"), &edge("other", "+ t"), &["-g0"]);
    assert_eq!(
        p.refusal("edge", "call to step #0"),
        "local 1 (a compiler temporary) is live there and has no counterpart in the old frame: the new version computes it otherwise than the old one computed local 1 (code only the new version has writes it, or writes it from other values)"
    );
}

/// As [`a_loop_that_reaches_changed_code_refuses_the_temporaries_it_writes`],
/// with a branch in the loop before the call: the loop still ends where it
/// ends, not at the branch's `end`.
#[test]
fn a_loop_with_a_branch_before_the_point_still_reaches_the_changed_code() {
    let body = |change: &str| program(&format!("if (acc & 1) sink = acc; {change}"), "");
    let p = pair("frames-escape-branch", &body(""), &body("acc ^= 3;"));
    let reason = p.refusal("main", "call to step #0");
    assert!(reason.contains("(a compiler temporary) is live there and has no counterpart in the old frame: "), "{reason}");
}

/// `b` is read after the call only in the new version: the old frame,
/// saved at the call, does not hold it (it was dead there), so the
/// parameter rule that would copy it has nothing to copy.
const DEAD_THEN_LIVE_V1: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int step(int x) { int s = 0; for (int i = 0; i < x; i++) s += i; printf("%d\n", s); return s; }
__attribute__((noinline)) int keep(int a, int b) { int x = step(a + b); return x + 1; }
int main(int argc, char **argv) { printf("%d\n", keep(argc, argc + 1)); return 0; }
"#;

const DEAD_THEN_LIVE_V2: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int step(int x) { int s = 0; for (int i = 0; i < x; i++) s += i; printf("%d\n", s); return s; }
__attribute__((noinline)) int keep(int a, int b) { int x = step(a + b); return x + b; }
int main(int argc, char **argv) { printf("%d\n", keep(argc, argc + 1)); return 0; }
"#;

#[test]
fn a_local_the_old_frame_did_not_save_is_refused_not_invented() {
    let p = pair_with("frames-dead-then-live", DEAD_THEN_LIVE_V1, DEAD_THEN_LIVE_V2, &["-g0"]);
    assert!(p.changed.iter().any(|c| c == "keep"), "{:?}", p.changed);
    let keep = p.func("keep");
    let old_rp = p.old_meta.function(keep).unwrap().resume_points.iter().find(|rp| rp.kind == ResumeKind::Call).unwrap();
    assert!(!old_rp.locals.contains(&1), "b is dead after the old call: {:?}", old_rp.locals);
    let reason = p.refusal("keep", "call to step #0");
    assert!(reason.contains("old local 1, which the old frame does not hold"), "{reason}");
}

/// A loop body whose two statements of the same shape swapped places,
/// without DWARF: the diff pairs each statement with the other one's
/// (they differ only in which local they read), so the renaming of locals
/// comes out crosswise. The walks catch it, and each call point is
/// refused naming the variable, never mapped crosswise. (Told apart only
/// by which variable each reads, the two would need pairing by value
/// rather than by position: not done.)
#[test]
fn a_loop_body_whose_look_alike_statements_swapped_is_refused_not_mapped_crosswise() {
    let body = |first: &str, second: &str| {
        format!(
            r#"
#include <stdio.h>
volatile int sink, running = 300;
__attribute__((noinline)) int step(int n) {{
    int s = 0;
    for (int i = 0; i < n; i++) {{ s += i * i; sink = s; }}
    return s;
}}
int main(int argc, char **argv) {{
    (void)argv;
    int a = argc, b = 1;
    while (running-- > 0) {{
        {first}
        {second}
        sink = a ^ b;
    }}
    printf("%d %d\n", a, b);
    return 0;
}}
"#
        )
    };
    let (x, y) = ("a += step(a & 7);", "b += step(b & 7) * 2;");
    let p = pair_with("frames-reordered", &body(x, y), &body(y, x), &["-g0"]);
    assert!(p.changed.iter().any(|c| c == "main"), "{:?}", p.changed);
    for point in ["call to step #0", "call to step #1"] {
        let refusal = p.refusal("main", point);
        assert!(
            refusal.contains("(a compiler temporary) is live there and has no counterpart in the old frame: the new version computes it otherwise"),
            "{point}: {refusal}"
        );
    }
}
