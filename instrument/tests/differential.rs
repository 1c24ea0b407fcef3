//! Differential tests: a module and its instrumented version must be
//! indistinguishable to the program, run plainly and with unwinds forced at
//! update points (stress mode) and inside blocking imports, and started on
//! the unwind-only variant, moving to the full one at its first unwind.
//!
//! The subjects are random modules from wasm-smith, limited to the features
//! the instrumenter accepts and made terminating with wasm-smith's fuel, and
//! hand-written modules for the shapes the rewrite must get right. The
//! harness is in `support`.

mod support;

use arbitrary::Unstructured;
use support::{check, engine};

/// Number of random modules; each runs plainly, in three stress modes and
/// with host-requested pauses (see `support::MODES`).
const RANDOM_MODULES: u64 = 250;

/// A small deterministic byte source, so every run tests the same modules
/// and a failure names its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn smith_config(seed: u64) -> wasm_smith::Config {
    let imports = !seed.is_multiple_of(3);
    // Every fifth module is larger, for deeper stacks and nesting.
    let big = seed % 5 == 1;
    wasm_smith::Config {
        simd_enabled: false,
        relaxed_simd_enabled: false,
        exceptions_enabled: false,
        tail_call_enabled: false,
        gc_enabled: false,
        memory64_enabled: false,
        threads_enabled: false,
        extended_const_enabled: false,
        custom_page_sizes_enabled: false,
        wide_arithmetic_enabled: false,
        shared_everything_threads_enabled: false,
        custom_descriptors_enabled: false,
        bulk_memory_enabled: true,
        sign_extension_ops_enabled: true,
        saturating_float_to_int_enabled: true,
        multi_value_enabled: true,
        // The test engine has no GC support, so modules using externref are
        // only instrumented, not run; most modules with reference types use
        // it.
        reference_types_enabled: seed.is_multiple_of(4),
        max_memories: 1,
        max_tables: 2,
        max_memory32_bytes: 4 * 65536,
        max_table_elements: 64,
        max_funcs: if big { 24 } else { 12 },
        min_funcs: 1,
        max_instructions: if big { 600 } else { 120 },
        max_types: 16,
        max_globals: 8,
        max_data_segments: 4,
        max_element_segments: 4,
        max_elements: 16,
        export_everything: true,
        // Linkers pad LEBs; copied operators must keep their padding.
        min_uleb_size: if seed % 7 == 3 { 5 } else { 1 },
        // Random code traps early; half the modules run longer without
        // traps (the fuel check still ends them).
        disallow_traps: seed % 2 == 1,
        max_imports: if imports { 3 } else { 0 },
        available_imports: imports.then(|| wat::parse_str(support::AVAILABLE_IMPORTS).expect("imports wat")),
        ..wasm_smith::Config::default()
    }
}

/// The engine has no GC, so modules whose types need it are only
/// instrumented and validated, not run.
fn runnable(wasm: &[u8]) -> bool {
    let mut features = wasmparser::WasmFeatures::default();
    features.remove(wasmparser::WasmFeatures::GC_TYPES);
    wasmparser::Validator::new_with_features(features).validate_all(wasm).is_ok()
}

#[test]
fn random_modules_behave_the_same_instrumented() {
    let engine = engine();
    let started = std::time::Instant::now();
    let (mut ran, mut unwinds, mut depth, mut not_run, mut rejected, mut switched, mut dead_slots) = (0u64, 0u64, 0usize, 0u64, 0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    // UPSTARE_SEEDS=FIRST..LAST runs another range, for longer searches.
    let seeds = match std::env::var("UPSTARE_SEEDS") {
        Ok(r) => {
            let (a, b) = r.split_once("..").expect("UPSTARE_SEEDS=FIRST..LAST");
            a.parse().expect("first seed")..b.parse().expect("last seed")
        }
        Err(_) => 1..RANDOM_MODULES + 1,
    };
    let count = seeds.end - seeds.start;
    for seed in seeds {
        let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        // wasm-smith stops when the bytes run out, so size follows them.
        let len = if seed % 5 == 1 { 8192 + (rng.next() % 32768) } else { 512 + (rng.next() % 8192) } as usize;
        let data = rng.bytes(len);
        let mut u = Unstructured::new(&data);
        let Ok(mut module) = wasm_smith::Module::new(smith_config(seed), &mut u) else {
            rejected += 1;
            continue;
        };
        module.ensure_termination(1000).expect("fuel");
        let wasm = module.to_bytes();
        if !runnable(&wasm) {
            if let Err(e) = upstare_instrument::instrument(&wasm, &support::options()) {
                failures.push(format!("seed {seed}: instrument: {e}"));
            }
            not_run += 1;
            continue;
        }
        let one = std::time::Instant::now();
        let result = check(&engine, &wasm);
        if one.elapsed() > std::time::Duration::from_secs(5) {
            eprintln!("seed {seed} took {:?}", one.elapsed());
        }
        match result {
            Ok(stats) => {
                ran += 1;
                unwinds += stats.unwinds;
                depth = depth.max(stats.max_depth);
                switched += stats.switched;
                dead_slots += stats.dead_slots;
            }
            Err(e) => {
                // Set UPSTARE_DUMP to a directory to keep the failing modules.
                if let Some(dir) = std::env::var_os("UPSTARE_DUMP") {
                    std::fs::write(std::path::Path::new(&dir).join(format!("seed-{seed}.wasm")), &wasm).ok();
                }
                failures.push(format!("seed {seed}: {e}"));
            }
        }
    }
    eprintln!(
        "{ran} modules run, {not_run} only instrumented, {rejected} seeds wasm-smith could not build, {unwinds} unwinds, deepest {depth} frames, {switched} runs moved from the unwind-only variant to the full one, {dead_slots} dead slots scrambled, {:?}",
        started.elapsed()
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // The stated shares: wasm-smith builds nearly every seed, and at least
    // two thirds of the modules run (the rest use references the test
    // engine cannot run).
    assert!(rejected * 20 <= count, "wasm-smith could not build {rejected} of {count} seeds");
    assert!(ran * 3 >= count * 2, "only {ran} of {count} modules ran");
    assert!(unwinds > count, "stress mode unwound only {unwinds} times");
    // Most modules change no table at run time, so they also run from the
    // unwind-only variant (four periods each), and many of those unwind.
    assert!(switched * 2 >= count, "only {switched} runs moved from the unwind-only variant");
}

fn check_wat(name: &str, wat: &str) {
    let wasm = wat::parse_str(wat).unwrap_or_else(|e| panic!("{name}: {e}"));
    let stats = check(&engine(), &wasm).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(stats.unwinds > 0, "{name}: stress mode never unwound");
}

#[test]
fn loops_with_block_params_and_results() {
    check_wat(
        "multi-value loops",
        r#"(module
          (memory (export "mem") 1)
          (global $g (export "g") (mut i64) (i64.const 0))
          (func (export "sum") (param $n i32) (result i32 i64)
            (local $i i32)
            i32.const 0
            i64.const 1
            (loop $l (param i32 i64) (result i32 i64)
              ;; acc, prod on the stack across the header
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 40
              i32.lt_u
              (if (param i32 i64) (result i32 i64)
                (then
                  i64.const 3
                  i64.mul
                  (block (param i64) (result i64)
                    (loop (param i64) (result i64)))
                  global.get $g
                  i64.add
                  global.set $g
                  local.get $i
                  i32.add
                  global.get $g
                  br $l)
                (else)))
          )
          (func (export "nested") (result i32)
            (local $a i32) (local $b i32)
            i32.const 100
            (block $out (param i32) (result i32)
              (loop $outer (param i32) (result i32)
                (loop $inner (param i32) (result i32)
                  local.get $b
                  i32.const 1
                  i32.add
                  local.tee $b
                  i32.const 5
                  i32.rem_u
                  br_if $inner
                  i32.const 1
                  i32.add
                  local.get $a
                  i32.const 1
                  i32.add
                  local.tee $a
                  i32.const 7
                  i32.lt_u
                  br_if $outer)
                ))
            i32.const 0
            local.get $b
            i32.store
          )
        )"#,
    );
}

#[test]
fn br_table_out_of_loops() {
    check_wat(
        "br_table",
        r#"(module
          (memory (export "mem") 1)
          (func (export "run") (param $x i32) (result i32)
            (local $i i32) (local $acc i32)
            (block $a (result i32)
              (block $b
                (block $c
                  (loop $l
                    local.get $acc
                    local.get $i
                    i32.add
                    local.set $acc
                    local.get $i
                    i32.const 1
                    i32.add
                    local.tee $i
                    i32.const 3
                    i32.and
                    (br_table $l $l $c $l $b)
                  )
                  unreachable)
                local.get $i
                i32.const 30
                i32.lt_u
                br_if 0
                local.get $acc
                br $a)
              i32.const -1))
          (func (export "run2") (result i32)
            (local $i i32)
            i32.const 7
            (block $done (param i32) (result i32)
              (loop $l (param i32) (result i32)
                (loop $m (param i32) (result i32)
                  i32.const 1
                  i32.add
                  local.get $i
                  i32.const 1
                  i32.add
                  local.tee $i
                  i32.const 64
                  i32.ge_u
                  local.get $i
                  i32.const 100
                  i32.ge_u
                  i32.add
                  (br_table $m $l $done)))))
          (func (export "run3") (result i32)
            (local $i i32)
            (block $exit (result i32)
              i32.const 0
              (loop $l (param i32) (result i32)
                drop
                local.get $i
                local.get $i
                i32.const 1
                i32.add
                local.tee $i
                i32.const 50
                i32.ge_u
                (br_table $l $exit))))
        )"#,
    );
}

#[test]
fn calls_in_if_arms_with_operands_below() {
    check_wat(
        "calls in if arms",
        r#"(module
          (memory (export "mem") 1)
          (func $spin (param $n i32) (result i32)
            (local $i i32)
            (loop $l
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              local.get $n
              i32.lt_u
              br_if $l)
            local.get $i
            i32.const 1000
            i32.mul)
          (func $pair (param i32) (result i32 f64)
            local.get 0
            call $spin
            local.get 0
            f64.convert_i32_s)
          (func (export "arms") (param $x i32) (result i32)
            (local $t i32)
            i32.const 11
            i64.const 22
            f32.const 3.5
            local.get $x
            (if (param f32) (result f32 i32)
              (then
                i32.const 5
                call $spin
                i32.const 2
                call $spin
                i32.add)
              (else
                f32.const 1
                f32.add
                i32.const 9
                call $pair
                i32.trunc_f64_s
                i32.add))
            i32.const 4
            call $spin
            i32.add
            i32.const 0
            local.get $x
            i32.store
            local.set $t
            i32.trunc_f32_s
            local.get $t
            i32.add
            local.set $t
            i32.wrap_i64
            i32.add
            local.get $t
            i32.add)
          (func (export "arms0") (result i32)
            i32.const 0
            call 2)
          (func (export "cond") (result i32)
            i32.const 1
            i32.const 3
            call $spin
            (if (result i32) (then i32.const 6 call $spin) (else i32.const 0))
            i32.add)
        )"#,
    );
}

/// A `switch` nest opened at the function's start: the levels of `$exit`
/// and `$c2` and the top level leave their rewind dispatch to `$c1`, whose
/// one test pops the frame and branches outward to their anchors (a call
/// with an operand kept below it, an `if` with a param, a blocking call).
#[test]
fn switch_nests_share_one_rewind_test() {
    check_wat(
        "switch nest",
        r#"(module
          (import "env" "block" (func $block (param i32) (result i32)))
          (memory (export "mem") 1)
          (func $step (param $x i32) (result i32)
            (local $i i32)
            (loop $l
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 3
              i32.lt_u
              br_if $l)
            local.get $x
            local.get $i
            i32.add)
          (func $dispatch (param $op i32) (param $v i32) (result i32)
            (block $exit
              (block $c2
                (block $c1
                  (block $c0
                    local.get $op
                    br_table $c0 $c1 $c2 $exit)
                  local.get $v
                  call $step
                  local.set $v
                  br $exit)
                local.get $v
                local.get $v
                call $block
                i32.add
                local.set $v
                br $exit)
              local.get $v
              i32.const 7
              local.get $v
              i32.const 1
              i32.and
              (if (param i32) (result i32)
                (then local.get $v call $step i32.add)
                (else local.get $v call $block i32.sub))
              i32.add
              local.set $v)
            local.get $v
            local.get $v
            call $step
            i32.add)
          (func (export "run") (result i32)
            (local $op i32) (local $acc i32)
            (loop $l
              local.get $op
              i32.const 4
              i32.rem_u
              local.get $acc
              local.get $op
              i32.add
              call $dispatch
              local.set $acc
              local.get $op
              i32.const 1
              i32.add
              local.tee $op
              i32.const 12
              i32.lt_u
              br_if $l)
            local.get $acc)
        )"#,
    );
}

#[test]
fn call_indirect_through_a_table() {
    check_wat(
        "call_indirect",
        r#"(module
          (import "env" "block" (func $block (param i32) (result i32)))
          (import "env" "work" (func $work (param i32) (result i32)))
          (type $t (func (param i32) (result i32)))
          (memory (export "mem") 1)
          (table $tab 5 funcref)
          (elem (i32.const 0) func $loop $block $work $rec $plain)
          (func $loop (param $n i32) (result i32)
            (local $i i32)
            (loop $l
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              local.get $n
              i32.lt_u
              br_if $l)
            local.get $i)
          (func $rec (param $n i32) (result i32)
            local.get $n
            i32.eqz
            (if (result i32) (then i32.const 1)
              (else
                local.get $n
                i32.const 1
                i32.sub
                i32.const 3
                call_indirect (type $t)
                local.get $n
                local.get $n
                i32.const 3
                i32.rem_u
                call_indirect (type $t)
                i32.add)))
          (func $plain (param i32) (result i32) local.get 0 i32.const 2 i32.mul)
          (func (export "each") (result i32)
            (local $k i32) (local $acc i32)
            (loop $l
              i64.const 99
              local.get $acc
              i32.const 8
              local.get $k
              call_indirect (type $t)
              i32.add
              local.set $acc
              drop
              local.get $k
              i32.const 1
              i32.add
              local.tee $k
              i32.const 5
              i32.lt_u
              br_if $l)
            local.get $acc)
          (func (export "rec") (result i32)
            i32.const 12
            call $rec)
          (func (export "blocking") (result i32)
            (local $i i32) (local $acc i32)
            (loop $l
              local.get $acc
              local.get $i
              call $block
              i32.add
              local.set $acc
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 10
              i32.lt_u
              br_if $l)
            local.get $acc)
        )"#,
    );
}

#[test]
fn numeric_and_reference_locals_survive_unwinds() {
    check_wat(
        "typed locals",
        r#"(module
          (memory (export "mem") 1)
          (table $t 2 funcref)
          (elem declare func $f $g)
          (global $out (export "out") (mut f64) (f64.const 0))
          (func $f (result i32) i32.const 17)
          (func $g (result i32) i32.const 23)
          (type $r (func (result i32)))
          (func (export "mix") (param $p f32) (result i64 f64 f32 i32)
            (local $a i64) (local $b f64) (local $fr funcref) (local $i i32)
            ref.func $f
            local.set $fr
            i64.const 0x7fff_ffff_ffff
            local.set $a
            f64.const 1.25
            local.set $b
            (loop $l
              local.get $a
              i64.const 0x1_0000_0001
              i64.mul
              local.set $a
              local.get $b
              f64.const 1.5
              f64.mul
              local.set $b
              local.get $p
              f32.const -0.5
              f32.add
              local.set $p
              local.get $i
              i32.const 1
              i32.and
              (if (then ref.func $g local.set $fr) (else ref.func $f local.set $fr))
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 21
              i32.lt_u
              br_if $l)
            i32.const 0
            local.get $fr
            table.set $t
            local.get $b
            global.set $out
            i32.const 8
            local.get $a
            i64.store
            local.get $a
            local.get $b
            local.get $p
            i32.const 0
            call_indirect $t (type $r))
          (func (export "null") (result i32)
            (local $fr funcref) (local $i i32)
            (loop $l
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 4
              i32.lt_u
              br_if $l)
            local.get $fr
            ref.is_null)
        )"#,
    );
}

/// A function with a loop, so that calls to it can unwind: it counts to
/// its argument's low two bits and adds the count to it.
const SPIN: &str = r#"(func $spin (param $v i32) (result i32)
            (local $i i32)
            (loop $l
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              local.get $v
              i32.const 3
              i32.and
              i32.lt_u
              br_if $l)
            local.get $v
            local.get $i
            i32.add)"#;

/// Calls whose live locals differ by one or two share their unwind code,
/// so their frames have slots for locals dead at the call. Those slots
/// hold zero; the harness overwrites them before every rewind, which
/// changes nothing as long as the rewind reads no dead local.
#[test]
fn dead_locals_in_a_shared_frame_layout_hold_zero_and_are_never_read() {
    let wasm = wat::parse_str(format!(
        r#"(module
          (memory (export "mem") 1)
          {SPIN}
          (func (export "chain") (param $n i32) (result i64)
            (local $a i32) (local $b i32) (local $c i32) (local $w i64) (local $x f64)
            local.get $n
            i32.const 3
            i32.add
            local.set $a
            local.get $n
            i64.extend_i32_u
            local.set $w
            f64.const 2.5
            local.set $x
            local.get $n
            call $spin           ;; $a $n $w $x live
            local.set $b
            local.get $a
            call $spin           ;; $a dead from here: $b $n $w $x live
            local.get $b
            i32.add
            local.set $c
            local.get $c
            call $spin           ;; $c $n $w $x live
            local.set $b
            local.get $w
            local.get $x
            i64.trunc_f64_s
            i64.add
            local.set $w
            local.get $b
            call $spin           ;; only $n $w live: $x, $b dead
            local.get $n
            i32.add
            i64.extend_i32_u
            local.get $w
            i64.mul))"#
    ))
    .expect("wat");
    let stats = support::check(&support::engine(), &wasm).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.unwinds > 0, "stress mode never unwound");
    assert!(stats.dead_slots > 0, "no frame had a slot for a dead local");
}

/// A generated function of straight-line code: 80 calls that can unwind,
/// and 24 locals of three types, each set before one call and read after
/// a later one, so nearly every call has its own set of live locals and
/// most share unwind code with others through slots of dead locals. The
/// result folds every value read in order, so a local restored wrongly,
/// or a dead slot a rewind read, changes it.
fn straight_line_module(seed: u64) -> String {
    const CALLS: usize = 80;
    const LOCALS: usize = 24;
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut set_at = vec![Vec::new(); CALLS];
    let mut read_at = vec![Vec::new(); CALLS];
    for l in 0..LOCALS {
        let set = rng.next() as usize % CALLS;
        let read = set + rng.next() as usize % (CALLS - set);
        set_at[set].push(l);
        read_at[read].push(l);
    }
    let ty = |l: usize| ["i32", "i64", "f64"][l % 3];
    let mut body = String::new();
    for i in 0..CALLS {
        for &l in &set_at[i] {
            body += &match ty(l) {
                "i32" => format!("local.get $n i32.const {} i32.add local.set $x{l}\n", i * 7 + l),
                "i64" => format!("local.get $n i64.extend_i32_u i64.const {} i64.mul local.set $x{l}\n", i + l + 3),
                _ => format!("local.get $n f64.convert_i32_s f64.const {}.5 f64.add local.set $x{l}\n", i + l),
            };
        }
        body += "local.get $acc i32.wrap_i64 call $spin i64.extend_i32_u local.get $acc i64.add local.set $acc\n";
        for &l in &read_at[i] {
            let value = match ty(l) {
                "i32" => format!("local.get $x{l} i64.extend_i32_s"),
                "i64" => format!("local.get $x{l}"),
                _ => format!("local.get $x{l} i64.trunc_f64_s"),
            };
            body += &format!("local.get $acc i64.const 31 i64.mul {value} i64.add local.set $acc\n");
        }
    }
    let locals: String = (0..LOCALS).map(|l| format!("(local $x{l} {})", ty(l))).collect();
    format!(
        r#"(module
          (memory (export "mem") 1)
          {SPIN}
          (func (export "line") (param $n i32) (result i64) (local $acc i64) {locals}
            {body}
            local.get $acc))"#
    )
}

#[test]
fn straight_line_code_with_many_calls_restores_every_live_local() {
    let mut dead_slots = 0;
    for seed in 1..=6 {
        let wasm = wat::parse_str(straight_line_module(seed)).expect("wat");
        let stats = support::check(&support::engine(), &wasm).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(stats.unwinds > 0, "seed {seed}: stress mode never unwound");
        dead_slots += stats.dead_slots;
    }
    assert!(dead_slots > 1000, "only {dead_slots} dead slots: the points did not share unwind code");
}

/// Two functions, each with `LOCALS` `i32`s live across a call that
/// unwinds and across a recursive call: frames larger than the first page
/// of the control memory, with more slots than a function type may have
/// params or results, and a list of slot types two save classes share.
/// Their code stores and loads the slots inline and grows the control
/// memory itself before storing a frame that the room it keeps past the
/// frame stack pointer cannot hold.
fn big_frames_module() -> String {
    const LOCALS: usize = 9000;
    let function = |name: &str| {
        let locals: String = (0..LOCALS).map(|l| format!("(local $x{l} i32)")).collect();
        let set: String = (0..LOCALS).map(|l| format!("local.get $n i32.const {l} i32.add local.set $x{l}\n")).collect();
        let sum: String = (0..LOCALS).map(|l| format!("local.get $acc local.get $x{l} i64.extend_i32_u i64.add local.set $acc\n")).collect();
        format!(
            r#"(func ${name} (export "{name}") (param $n i32) (result i64) (local $acc i64) {locals}
              {set}
              local.get $n call $spin drop
              (if (i32.gt_u (local.get $n) (i32.const 0))
                (then (local.set $acc (call ${name} (i32.sub (local.get $n) (i32.const 1))))))
              {sum}
              local.get $acc)"#
        )
    };
    format!(r#"(module (memory (export "mem") 1) {SPIN} {} {})"#, function("big"), function("twin"))
}

/// One stress run only (an unwind and rewind at every update point): the
/// full check's other modes add a minute and nothing to what this tests.
#[test]
fn frames_larger_than_the_control_headroom_are_saved_and_restored() {
    let wasm = wat::parse_str(big_frames_module()).expect("wat");
    let engine = support::engine();
    let mode = support::Mode::Stress { period: 1, inject: None };
    let inst = upstare_instrument::instrument(&wasm, &support::options_for(mode)).expect("instrument");
    let want = support::run_original(&engine, &wasm);
    let (got, stats) = support::run_instrumented(&engine, &wasm, &inst, mode, None).unwrap_or_else(|e| panic!("{e}"));
    if let Some(d) = support::diff(&want, &got) {
        panic!("{d}");
    }
    assert!(stats.unwinds > 0, "stress mode never unwound");
}

/// wasmtime here has no GC, so modules with externref are checked by the
/// validator and the metadata only.
#[test]
fn externref_locals_are_saved_through_the_side_table() {
    let wasm = wat::parse_str(
        r#"(module
          (func (export "keep") (param $r externref) (result externref)
            (local $i i32) (local $s externref)
            local.get $r
            local.set $s
            local.get $s
            (loop $l (param externref) (result externref)
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 3
              i32.lt_u
              br_if $l)
            drop
            local.get $s))"#,
    )
    .expect("wat");
    let out = upstare_instrument::instrument(&wasm, &support::options()).expect("instrument");
    let meta = &out.metadata;
    // Only the side table a frame needs: an engine without GC could not
    // compile an externref table, and one with funcrefs only must not get one.
    assert_eq!(meta.funcref_table, None);
    assert_eq!(meta.externref_table, Some(0));
    let f = meta.function(0).expect("keep is instrumented");
    assert_eq!(f.locals, [upstare_instrument::abi::ValType::ExternRef, upstare_instrument::abi::ValType::I32, upstare_instrument::abi::ValType::ExternRef]);
    assert_eq!(f.resume_points.len(), 1);
    assert_eq!(f.resume_points[0].operands, [upstare_instrument::abi::ValType::ExternRef]);
}

#[test]
fn start_function_and_active_data() {
    check_wat(
        "start and data",
        r#"(module
          (memory (export "mem") 1 2)
          (global $g (export "g") (mut i32) (i32.const 0))
          (data (i32.const 16) "hello, world")
          (data $p "passive")
          (data (i32.const 40) "\01\02\03\04")
          (func $start
            (local $i i32)
            (loop $l
              local.get $i
              i32.const 16
              i32.add
              i32.load8_u
              global.get $g
              i32.add
              global.set $g
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 12
              i32.lt_u
              br_if $l))
          (start $start)
          (func (export "copy") (result i32)
            i32.const 100
            i32.const 0
            i32.const 7
            memory.init $p
            i32.const 100
            i32.load
            global.get $g
            i32.add)
          (func (export "grow") (result i32)
            i32.const 1
            memory.grow
            i32.const 1
            memory.grow
            i32.add)
        )"#,
    );
}

#[test]
fn recursion_a_thousand_deep_with_a_loop_at_each_level() {
    check_wat(
        "deep recursion",
        r#"(module
          (memory (export "mem") 1)
          (func $down (param $n i32) (result i64)
            (local $i i32) (local $acc i64)
            (loop $l
              local.get $acc
              local.get $i
              i64.extend_i32_u
              i64.add
              local.set $acc
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 2
              i32.lt_u
              br_if $l)
            local.get $n
            (if (result i64)
              (then
                local.get $acc
                local.get $n
                i32.const 1
                i32.sub
                call $down
                i64.add
                local.get $n
                i64.extend_i32_u
                i64.mul)
              (else local.get $acc)))
          (func (export "deep") (result i64)
            i32.const 1000
            call $down))"#,
    );
}

#[test]
fn shared_memory_with_atomics() {
    check_wat(
        "shared memory",
        r#"(module
          (memory (export "mem") 1 4 shared)
          (data (i32.const 64) "\05\00\00\00")
          (func (export "count") (result i32)
            (local $i i32)
            (loop $l
              i32.const 0
              i32.const 3
              i32.atomic.rmw.add
              drop
              i32.const 8
              i64.const 1
              i64.atomic.rmw.xor
              drop
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 25
              i32.lt_u
              br_if $l)
            i32.const 0
            i32.atomic.load
            i32.const 64
            i32.atomic.load
            i32.add))"#,
    );
}

/// The two ways out of the usual protocol: an instance created over memory
/// that is already initialised (an update) drops the active segments
/// instead of applying them, and a pause can be abandoned by the host
/// (normal state, an empty frame stack; `abi::State`), after which the
/// export runs again from the start.
#[test]
fn drop_data_over_live_memory_and_abandoned_rewind() {
    use upstare_instrument::abi::{control, exports};
    use wasmtime::{Linker, MemoryType, Module, SharedMemory, Store};

    let wasm = wat::parse_str(
        r#"(module
          (memory (export "mem") 1)
          (data (i32.const 0) "abc")
          (func (export "reinit") (result i32)
            i32.const 10 i32.const 0 i32.const 3
            memory.init 0
            i32.const 10
            i32.load8_u)
          (func (export "spin") (result i32)
            (local $i i32)
            (loop $l
              local.get $i
              i32.const 1
              i32.add
              local.tee $i
              i32.const 100
              i32.lt_u
              br_if $l)
            local.get $i))"#,
    )
    .expect("wat");
    let out = upstare_instrument::instrument(&wasm, &support::options()).expect("instrument");
    let engine = engine();
    let module = Module::new(&engine, &out.wasm).expect("compile");
    let mut store = Store::new(&engine, ());
    let memory = SharedMemory::new(&engine, MemoryType::shared(1, out.metadata.memory.import_max())).expect("memory");
    let control = SharedMemory::new(&engine, MemoryType::shared(1, 65536)).expect("control");
    // The program memory is shared, as the instrumenter declares it.
    // SAFETY: no wasm runs while the test reads.
    let program = |at: usize| unsafe { *memory.data()[at].get() };
    // SAFETY: no wasm runs while the test writes.
    let set_program = |at: usize, b: u8| unsafe { *memory.data()[at].get() = b };
    let write = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: no wasm runs while the test writes.
            unsafe { *control.data()[at + i].get() = *b };
        }
    };
    write(0, &control::Header::default().encode());
    let mut linker = Linker::new(&engine);
    linker.define(&mut store, "upstare", "memory", memory.clone()).expect("define");
    linker.define(&mut store, "upstare", "control", control.clone()).expect("define");

    let first = linker.instantiate(&mut store, &module).expect("instantiate");
    let call = |store: &mut Store<()>, i: &wasmtime::Instance, name: &str| {
        i.get_typed_func::<(), ()>(&mut *store, name).expect(name).call(&mut *store, ())
    };
    call(&mut store, &first, exports::INIT_MEMORY).expect("init");
    assert_eq!([program(0), program(1), program(2)], *b"abc");
    let reinit = first.get_typed_func::<(), i32>(&mut store, "reinit").expect("reinit");
    assert!(reinit.call(&mut store, ()).is_err(), "an applied segment is dropped, as after instantiation");

    // The next version over the same memory: nothing is applied again.
    set_program(0, b'z');
    let second = linker.instantiate(&mut store, &module).expect("instantiate");
    call(&mut store, &second, exports::DROP_DATA).expect("drop");
    assert_eq!([program(0), program(1), program(2)], *b"zbc");
    let reinit = second.get_typed_func::<(), i32>(&mut store, "reinit").expect("reinit");
    assert!(reinit.call(&mut store, ()).is_err(), "the segment is dropped without being applied");

    // Pause at the first loop header, then abandon the rewind.
    let spin = second.get_typed_func::<(), i32>(&mut store, "spin").expect("spin");
    let state = second.get_global(&mut store, exports::STATE).expect("state");
    write(0, &control::Header { pause: true, ..control::Header::default() }.encode());
    spin.call(&mut store, ()).expect("spin unwinds");
    assert_eq!(state.get(&mut store).i32(), Some(1));
    // SAFETY: no wasm runs while the test reads.
    let header = || control::Header::decode(&control.data()[..64].iter().map(|c| unsafe { *c.get() }).collect::<Vec<u8>>());
    assert!(header().is_some_and(|h| h.frame_sp > control::FRAMES_BASE), "a frame was saved");
    // Abandoned: normal state, no rewinding byte, no frames.
    state.set(&mut store, wasmtime::Val::I32(0)).expect("normal");
    write(0, &control::Header::default().encode());
    assert_eq!(header(), Some(control::Header::default()));
    assert_eq!(spin.call(&mut store, ()).expect("spin runs"), 100);
    assert_eq!(state.get(&mut store).i32(), Some(0));
}

/// Two functions that call each other: every cycle of calls passes through
/// both, so the plain variant checks the entry of one of them only (the
/// stress variant checks both). A frame unwound at the other's entry, as
/// a version that checked it leaves one, still rewinds into the plain
/// variant and the call ends as the original's does.
#[test]
fn a_recursive_entry_without_a_check_still_takes_a_rewind() {
    let wasm = wat::parse_str(
        r#"(module
          (import "env" "work" (func $work (param i32) (result i32)))
          (memory (export "mem") 1)
          (func $f (export "f") (param $n i32) (result i32)
            local.get $n
            i32.eqz
            if (result i32)
              i32.const 1
            else
              local.get $n
              call $work
              local.get $n
              i32.const 1
              i32.sub
              call $g
              i32.add
            end)
          (func $g (param $n i32) (result i32)
            local.get $n
            i32.eqz
            if (result i32)
              i32.const 2
            else
              local.get $n
              i32.const 1
              i32.sub
              call $f
              local.get $n
              i32.mul
            end))"#,
    )
    .expect("wat");
    let engine = engine();
    let (f, g) = (1, 2);
    // With a pause requested all the time, the plain variant stops at the
    // entry of one function only.
    let stops = support::plain_stops(&engine, &wasm, "f", 9, 4).expect("plain run");
    assert_eq!(
        stops.len(),
        4,
        "the plain variant stopped {} times",
        stops.len()
    );
    let checked = stops[0].0;
    assert!(
        stops.iter().all(|&s| s == (checked, true)),
        "stops at {stops:?}"
    );
    let unchecked = if checked == f { g } else { f };
    let want = support::call_original(&engine, &wasm, "f", 9).expect("original");
    for func in [unchecked, checked] {
        let got =
            support::rewind_entry_across(&engine, &wasm, "f", 9, func).expect("rewind across");
        assert_eq!(got, want, "rewound at the entry of function {func}");
    }
}
