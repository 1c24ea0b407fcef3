//! Frames that go back to their loop header: the plan on the versions of
//! the poll-loop example server, whose main loop changes before `poll()` in
//! every version, built by the real toolchain.

mod support;

use std::sync::Arc;

use upstare_instrument::abi::Metadata;
use upstare_patchgen::frames::{describe, FrameMapper, FramePlan, Retreat, Source};
use upstare_patchgen::plan::plan;
use upstare_patchgen::version::Version;

struct Pair {
    old: Arc<Version>,
    old_meta: Metadata,
    frames: FramePlan,
}

fn metadata(wasm: &[u8]) -> Metadata {
    upstare_instrument::instrument(wasm, &Default::default()).expect("instrumentable").metadata
}

fn poll_server(from: u32, to: u32) -> Pair {
    let build = |v: u32| support::build_example("poll-server", &format!("poll-server-v{v}"), &[&format!("-DPOLL_VERSION={v}")]);
    let old = Arc::new(Version::initial(Arc::new(build(from))).unwrap());
    let p = plan(old.clone(), Arc::new(build(to))).unwrap();
    let linked = p.link(64 << 20).unwrap();
    let (old_meta, new_meta) = (metadata(&old.wasm), metadata(&linked.wasm));
    let frames = FrameMapper { old: (&old, &old_meta), new: (&linked.version, &new_meta), functions: &p.functions, identical_code_rule: true }.plan();
    Pair { old, old_meta, frames }
}

impl Pair {
    /// (function index, resume point index) of `function`'s `point`.
    fn point(&self, function: &str, point: &str) -> (u32, u32) {
        let func = self.old.info.functions.iter().position(|f| f.name.as_deref() == Some(function)).unwrap() as u32;
        let meta = self.old_meta.function(func).unwrap();
        let points: Vec<String> = meta.resume_points.iter().map(|rp| describe(&self.old, rp)).collect();
        let index = points.iter().position(|p| p == point).unwrap_or_else(|| panic!("{function} has no {point}: {points:?}"));
        (func, index as u32)
    }
}

impl Pair {
    fn retreat(&self, function: &str, point: &str) -> &Result<Retreat, String> {
        let (f, rp) = self.point(function, point);
        self.frames.retreat(f, rp).unwrap_or_else(|| panic!("{function} at {point} has no retreat plan"))
    }
}

const MAIN: &str = "__original_main";
const POLL: &str = "call to poll #0";

/// v2 adds a timeout and an idle branch to the loop, and a global: main's
/// frame in linear memory grows (the compiler inlines differently), so it
/// is rebuilt where it stands or goes back to its loop header.
#[test]
fn a_main_loop_changed_before_poll_goes_back_to_its_header() {
    let p = poll_server(1, 2);
    let (f, rp) = p.point(MAIN, POLL);
    // Where it stands, the frame is rebuilt only with the stack above it
    // (poll's frames); the retreat is planned too, for when it cannot be.
    let rebuilt = p.frames.recipe(f, rp).unwrap().as_ref().unwrap_or_else(|e| panic!("{e}"));
    assert!(rebuilt.relayout.is_some(), "{rebuilt:?}");
    let retreat = p.retreat(MAIN, POLL).as_ref().unwrap_or_else(|e| panic!("no retreat: {e}"));
    // The frame base and the address of `fds` are recomputed from the stack
    // pointer for the new layout; the listener and the count of descriptors
    // are the old frame's, found by pairing the two versions' code.
    let stack: Vec<i64> = retreat.recipe.locals.iter().filter_map(|s| match s {
        Source::Stack(k) => Some(*k),
        _ => None,
    }).collect();
    assert!(stack.contains(&retreat.new_stack_at_header), "the new frame base comes from the stack pointer: {:?}", retreat.recipe.locals);
    assert!(retreat.recipe.locals.iter().filter(|s| matches!(s, Source::Old(_))).count() >= 2, "{:?}", retreat.recipe.locals);
    assert_ne!(retreat.path.stack_at_header, retreat.new_stack_at_header, "the frame changed size");
    assert_eq!(retreat.moves.len(), 1, "`fds` is the frame's one variable in memory: {:?}", retreat.moves);
    // The frames above main: poll() and its wrapper of the import.
    let (g, grp) = p.point("poll", "call to __wasi_poll_oneoff #0");
    assert!(p.frames.discard(g, grp).unwrap().is_ok(), "{:?}", p.frames.discard(g, grp));
}

#[test]
fn the_next_version_of_the_loop_goes_back_too() {
    let p = poll_server(2, 3);
    assert!(p.retreat(MAIN, POLL).is_ok(), "{:?}", p.retreat(MAIN, POLL));
}

/// v4 reorders the loop body (accepting before serving) and v5 adds a call
/// before poll(): the code that moved pairs piece by piece, and the count
/// of entries in use, a temporary no debug information names, is still
/// found in the old frame.
#[test]
fn a_reordered_body_and_a_new_call_before_poll_go_back_too() {
    for (from, to) in [(3, 4), (4, 5)] {
        let p = poll_server(from, to);
        let (f, rp) = p.point(MAIN, POLL);
        let moves = match p.frames.retreat(f, rp) {
            Some(retreat) => retreat.as_ref().map(|_| ()).map_err(Clone::clone),
            None => p.frames.recipe(f, rp).unwrap().as_ref().map(|_| ()).map_err(|e| e.reason.clone()),
        };
        assert!(moves.is_ok(), "v{from} to v{to}: {moves:?}");
    }
    // v4 keeps the address of the counter to increment (`ticks` on a
    // timeout, `wakeups` at the end of the loop) in a local set on each
    // branch that leads there: in the loop that serves the connections it
    // is `wakeups`' on every path, and the frame is given that constant.
    let p = poll_server(3, 4);
    let (f, rp) = p.point(MAIN, "call to recv #0");
    let recipe = p.frames.recipe(f, rp).unwrap().as_ref().unwrap_or_else(|e| panic!("{e}"));
    assert!(recipe.locals.iter().any(|s| matches!(s, Source::Const(_))), "{:?}", recipe.locals);
}

/// v7 computes the count of entries in use anew before poll(), in code v4
/// does not have: the old frame holds no value the new code would, and
/// the refusal says so.
#[test]
fn a_temporary_the_new_code_computes_otherwise_is_refused_naming_why() {
    let p = poll_server(4, 7);
    let why = p.retreat(MAIN, POLL).as_ref().unwrap_err();
    assert!(why.contains("(a compiler temporary) is live at the new loop header and has no counterpart in the old frame: the new version computes it otherwise than the old one computed local"), "{why}");
}

/// v6 counts its iterations in a global before poll(): going back to the
/// header would count one twice.
#[test]
fn a_global_written_before_the_blocking_call_is_not_retreated() {
    let p = poll_server(6, 2);
    assert_eq!(
        p.retreat(MAIN, POLL).as_ref().unwrap_err(),
        "between its loop header and the call it stores to the global variable `loops`"
    );
}

/// Every function of a real program of some size, walked for retreats: the
/// analyses answer for each call that leads to a blocking call, and never
/// panic. (Run by hand on bigger modules with `UPSTARE_RETREAT_MODULE`.)
#[test]
fn every_call_of_a_real_program_gets_an_answer() {
    let wasm = match std::env::var_os("UPSTARE_RETREAT_MODULE") {
        Some(path) => std::fs::read(path).unwrap(),
        None => support::build_example("kv-server", "kv-server", &[]),
    };
    let version = Version::initial(Arc::new(wasm)).unwrap();
    let meta = metadata(&version.wasm);
    let analyser = upstare_patchgen::retreat::Analyser::new(&version);
    let (mut dropped, mut refused, mut retreats) = (0, 0, 0);
    for f in &meta.functions {
        for rp in &f.resume_points {
            let pc = rp.offset - meta.code_section;
            use upstare_instrument::abi::ResumeKind::*;
            match rp.kind {
                Call | BlockingCall => match analyser.discard(f.index, pc, rp.kind == BlockingCall) {
                    Ok(_) => dropped += 1,
                    Err(_) => refused += 1,
                },
                _ => continue,
            }
            if analyser.retreat_path(f.index, pc).is_ok() {
                retreats += 1;
            }
        }
    }
    eprintln!("{dropped} droppable, {refused} not, {retreats} could retreat");
    assert!(dropped > 0 && retreats > 0, "{dropped} droppable, {retreats} could retreat");
}

/// A CPU-bound loop whose body changed (the test chain `spin`), paused at
/// its header: the frame is rebuilt there, its sum and counter carried by
/// pairing the two versions' code, though the new version keeps the
/// callee's result in a temporary the old one does not have.
#[test]
fn a_frame_paused_at_the_header_of_a_changed_loop_is_rebuilt_there() {
    let src = std::fs::read_to_string(support::root().join("tests/guests/chains/spin/spin.c")).unwrap();
    let build = |v: &str| support::build_c(&format!("spin-{v}"), &src, &[&format!("-DSPIN_VERSION={v}")]);
    let old = Arc::new(Version::initial(Arc::new(build("1"))).unwrap());
    let p = plan(old.clone(), Arc::new(build("2"))).unwrap();
    let linked = p.link(64 << 20).unwrap();
    let (old_meta, new_meta) = (metadata(&old.wasm), metadata(&linked.wasm));
    let frames = FrameMapper { old: (&old, &old_meta), new: (&linked.version, &new_meta), functions: &p.functions, identical_code_rule: true }.plan();
    let pair = Pair { old, old_meta, frames };
    let retreat = pair.retreat("main", "loop #0").as_ref().unwrap_or_else(|e| panic!("not rebuilt: {e}"));
    assert!(retreat.path.at_header, "nothing to go back over");
    let old_locals = retreat.recipe.locals.iter().filter(|s| matches!(s, Source::Old(_))).count();
    assert!(old_locals >= 3, "n, the sum and the counter come from the old frame: {:?}", retreat.recipe.locals);
}

/// What the effect analysis says of `main`'s frame waiting in `poll()` when
/// `before` runs between its loop header and the call.
fn path_of(name: &str, before: &str) -> Result<(), String> {
    let src = format!(
        r#"
#include <poll.h>
#include <stdio.h>
int counter;
__attribute__((noinline)) static int pure_sum(const int *v, int n) {{
    int s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return s;
}}
__attribute__((noinline)) static void bump(void) {{ counter++; }}
__attribute__((noinline)) static void fill(int *p, int n) {{
    for (int i = 0; i < n; i++) p[i] = i;
}}
int main(int argc, char **argv) {{
    struct pollfd fds[1] = {{{{0, POLLIN, 0}}}};
    int local[4] = {{argc, 2, 3, 4}};
    volatile int ticks = 0;
    (void)argv;
    for (;;) {{
        {before}
        int r = poll(fds, 1, 1000);
        printf("%d %d\n", r, local[0]);
        if (r < 0) return 1;
    }}
}}
"#
    );
    let version = Version::initial(Arc::new(support::build_c(name, &src, &[]))).unwrap();
    let meta = metadata(&version.wasm);
    let main = version.info.functions.iter().position(|f| f.name.as_deref() == Some("main")).unwrap() as u32;
    let f = meta.function(main).unwrap();
    let call = f.resume_points.iter().find(|rp| describe(&version, rp) == "call to poll #0").expect("main calls poll");
    let analyser = upstare_patchgen::retreat::Analyser::new(&version);
    analyser.retreat_path(main, call.offset - meta.code_section).map(|_| ())
}

#[test]
fn a_path_that_only_reads_or_calls_what_has_no_effect_may_be_retreated() {
    assert_eq!(path_of("effect-pure", "if (pure_sum(local, 4) == 42) continue;"), Ok(()));
}

#[test]
fn a_path_that_calls_a_function_writing_a_global_is_not_retreated() {
    assert_eq!(
        path_of("effect-call", "bump();"),
        Err("between its loop header and the call it calls `bump`, which stores to the global variable `counter`".into())
    );
}

#[test]
fn a_path_that_writes_through_a_pointer_is_not_retreated() {
    assert_eq!(
        path_of("effect-pointer", "fill(local, 4);"),
        Err("between its loop header and the call it calls `fill`, which stores to memory outside its frame (through a pointer)".into())
    );
}

#[test]
fn a_path_that_reads_and_writes_the_same_frame_memory_is_not_retreated() {
    let e = path_of("effect-rmw", "ticks++;").unwrap_err();
    assert!(e.contains("reads and writes the same memory of its frame"), "{e}");
}
