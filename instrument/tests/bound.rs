//! The pause-bound exemptions (the crate docs' "The pause bound"): a loop
//! with a small constant trip count gets no check, a function whose loops
//! are all such loops and whose cost is small is left alone and calls to it
//! are no resume points, and everything just past a rule's edge keeps its
//! checks. The exempted programs still behave the same instrumented, in
//! stress mode too.

mod support;

use upstare_instrument::abi::ResumeKind;
use upstare_instrument::{instrument, Metadata, Options};

/// A module whose `sum` adds `TRIPS` bytes in a loop counted by `STEP`
/// from `START` while `i CMP BOUND`, and whose `main` calls it in a loop
/// that is not counted (its bound is a parameter).
fn counted(start: i32, step: &str, cmp: &str, bound: i32) -> String {
    format!(
        r#"(module
          (memory (export "memory") 1)
          (func $sum (export "sum") (param $p i32) (result i32)
            (local $i i32) (local $s i32)
            i32.const {start}
            local.set $i
            (loop $l
              local.get $s
              local.get $p
              local.get $i
              i32.add
              i32.load8_u
              i32.add
              local.set $s
              local.get $i
              {step}
              local.tee $i
              i32.const {bound}
              {cmp}
              br_if $l)
            local.get $s)
          (func $main (export "main") (param $n i32) (result i32)
            (local $t i32)
            (loop $o
              local.get $t
              local.get $n
              call $sum
              i32.add
              local.set $t
              local.get $n
              i32.const 1
              i32.sub
              local.tee $n
              br_if $o)
            local.get $t))"#
    )
}

fn metadata(wat: &str) -> Metadata {
    let wasm = wat::parse_str(wat).expect("wat");
    instrument(&wasm, &Options::default())
        .expect("instrument")
        .metadata
}

/// The resume points of function `f`, by kind, or `None` if it is left alone.
fn kinds(meta: &Metadata, f: u32) -> Option<Vec<ResumeKind>> {
    meta.function(f)
        .map(|f| f.resume_points.iter().map(|r| r.kind).collect())
}

#[test]
fn a_loop_of_sixteen_steps_needs_no_check_and_its_function_is_left_alone() {
    let meta = metadata(&counted(0, "i32.const 1 i32.add", "i32.ne", 16));
    assert_eq!(kinds(&meta, 0), None, "sum is left alone");
    // main keeps its own loop header, and calling sum is no resume point.
    assert_eq!(kinds(&meta, 1), Some(vec![ResumeKind::Loop]));
}

#[test]
fn counting_down_and_unsigned_and_signed_bounds_are_recognised() {
    for (start, step, cmp, bound) in [
        (64, "i32.const 1 i32.sub", "i32.gt_s", 0),
        (0, "i32.const 4 i32.add", "i32.lt_u", 256),
        (-10, "i32.const 1 i32.add", "i32.le_s", 10),
        (7, "i32.const -1 i32.add", "i32.ge_s", 0),
    ] {
        let meta = metadata(&counted(start, step, cmp, bound));
        assert_eq!(kinds(&meta, 0), None, "{start} {step} {cmp} {bound}");
    }
}

#[test]
fn loops_past_a_rule_keep_their_check() {
    for (why, start, step, cmp, bound) in [
        ("65 trips", 0, "i32.const 1 i32.add", "i32.ne", 65),
        ("never ends", 0, "i32.const 2 i32.add", "i32.ne", 15),
        (
            "wraps through the whole range",
            0,
            "i32.const 1 i32.sub",
            "i32.ne",
            16,
        ),
        (
            "an unsigned test that always holds",
            20,
            "i32.const 1 i32.sub",
            "i32.ge_u",
            0,
        ),
    ] {
        let meta = metadata(&counted(start, step, cmp, bound));
        assert_eq!(kinds(&meta, 0), Some(vec![ResumeKind::Loop]), "{why}");
        assert_eq!(
            kinds(&meta, 1),
            Some(vec![ResumeKind::Loop, ResumeKind::Call]),
            "{why}"
        );
    }
}

/// The counter must start at a constant on every path into the loop, be
/// written once per iteration, and the back edge must be the one br_if.
#[test]
fn counters_that_are_not_counted_keep_the_check() {
    let cases = [
        (
            "a counter from a parameter",
            "local.get $p local.set $i",
            "local.get $i i32.const 1 i32.add local.tee $i i32.const 16 i32.ne br_if $l",
        ),
        (
            "a counter set only in one arm",
            "local.get $p (if (then i32.const 0 local.set $i))",
            "local.get $i i32.const 1 i32.add local.tee $i i32.const 16 i32.ne br_if $l",
        ),
        (
            "a second write in the body",
            "i32.const 0 local.set $i",
            "local.get $p (if (then i32.const 0 local.set $i)) \
             local.get $i i32.const 1 i32.add local.tee $i i32.const 16 i32.ne br_if $l",
        ),
        (
            "a second branch back",
            "i32.const 0 local.set $i",
            "local.get $p br_if $l \
             local.get $i i32.const 1 i32.add local.tee $i i32.const 16 i32.ne br_if $l",
        ),
        (
            "the increment inside an if",
            "i32.const 0 local.set $i",
            "local.get $p (if (then local.get $i i32.const 1 i32.add local.set $i)) \
             local.get $i i32.const 16 i32.ne br_if $l",
        ),
    ];
    for (why, init, tail) in cases {
        let wat = format!(
            r#"(module
              (func (export "f") (param $p i32) (result i32)
                (local $i i32)
                {init}
                (loop $l {tail})
                local.get $i))"#
        );
        assert_eq!(
            kinds(&metadata(&wat), 0),
            Some(vec![ResumeKind::Loop]),
            "{why}"
        );
    }
}

/// A counted loop whose counter an enclosing loop carries on (it is set
/// once, before the outer loop) is not bounded on the outer loop's second
/// iteration.
#[test]
fn a_counter_set_outside_an_enclosing_loop_is_not_constant() {
    let wat = r#"(module
      (func (export "f") (param $n i32) (result i32)
        (local $i i32)
        i32.const 0
        local.set $i
        (loop $o
          (loop $l
            local.get $i i32.const 1 i32.add local.tee $i i32.const 16 i32.ne br_if $l)
          local.get $n i32.const 1 i32.sub local.tee $n br_if $o)
        local.get $i))"#;
    assert_eq!(
        kinds(&metadata(wat), 0),
        Some(vec![ResumeKind::Loop, ResumeKind::Loop])
    );
}

/// A bounded loop that calls a function with a check, or calls through a
/// table, keeps its own; so does one whose cost passes the budget.
#[test]
fn calls_and_cost_count_against_the_exemption() {
    let calls = r#"(module
      (type $t (func (param i32) (result i32)))
      (table 1 funcref)
      (func $spin (param $n i32) (result i32)
        (loop $l local.get $n i32.const 1 i32.sub local.tee $n br_if $l)
        local.get $n)
      (func (export "direct") (result i32)
        (local $i i32)
        i32.const 0 local.set $i
        (loop $l
          local.get $i call $spin drop
          local.get $i i32.const 1 i32.add local.tee $i i32.const 8 i32.ne br_if $l)
        local.get $i)
      (func (export "indirect") (result i32)
        (local $i i32)
        i32.const 0 local.set $i
        (loop $l
          local.get $i i32.const 0 call_indirect (type $t) drop
          local.get $i i32.const 1 i32.add local.tee $i i32.const 8 i32.ne br_if $l)
        local.get $i))"#;
    let meta = metadata(calls);
    assert_eq!(
        kinds(&meta, 1),
        Some(vec![ResumeKind::Loop, ResumeKind::Call])
    );
    assert_eq!(kinds(&meta, 2), Some(vec![ResumeKind::Loop]));

    // 64 trips of a body of 70 instructions: 4,480, past the 4,096 budget.
    let body = "local.get $i i32.const 1 i32.add drop ".repeat(15);
    let wat = format!(
        r#"(module
          (func (export "f") (result i32)
            (local $i i32)
            i32.const 0 local.set $i
            (loop $l
              {body}
              local.get $i i32.const 1 i32.add local.tee $i i32.const 64 i32.ne br_if $l)
            local.get $i))"#
    );
    assert_eq!(kinds(&metadata(&wat), 0), Some(vec![ResumeKind::Loop]));
    // 32 trips of it are within.
    let wat = wat.replace("i32.const 64 i32.ne", "i32.const 32 i32.ne");
    assert_eq!(kinds(&metadata(&wat), 0), None);
}

/// A function whose loops are all bounded but which, with the short
/// functions it calls, costs more than the budget keeps its checks.
#[test]
fn a_function_over_the_budget_keeps_its_checks() {
    let one = "local.get $i i32.const 1 i32.add drop ".repeat(10);
    let lp = format!(
        "i32.const 0 local.set $i (loop $l {one} local.get $i i32.const 1 i32.add local.tee $i i32.const 64 i32.ne br_if $l)"
    );
    // Each loop: 64 x 46 = 2,944; two of them pass 4,096.
    let wat = format!(
        r#"(module
          (func (export "one") (result i32) (local $i i32) {lp} local.get $i)
          (func (export "two") (result i32) (local $i i32) {lp} {lp} local.get $i))"#
    );
    let meta = metadata(&wat);
    assert_eq!(kinds(&meta, 0), None);
    assert_eq!(
        kinds(&meta, 1),
        Some(vec![ResumeKind::Loop, ResumeKind::Loop])
    );
}

/// The exempted programs run the same instrumented, in every stress mode of
/// the differential harness, and still unwind at the loop that has a check.
#[test]
fn exempted_loops_run_the_same_under_stress() {
    check_under_stress(&counted(0, "i32.const 1 i32.add", "i32.ne", 16));
}

/// Runs the module `wat` (of [`counted`] or [`shrinking`]) in the
/// differential harness, which checks it behaves the same instrumented in
/// every stress mode, and that stress mode unwinds. The harness calls
/// exports with zero arguments, and `main` with n = 0 would run its loop
/// 2^32 times: this `main` counts from a constant instead.
fn check_under_stress(wat: &str) {
    let with_param = r#"(func $main (export "main") (param $n i32) (result i32)
            (local $t i32)"#;
    assert!(wat.contains(with_param), "main takes n");
    let wat = wat.replace(
        with_param,
        r#"(func $main (export "main") (result i32)
            (local $t i32) (local $n i32)
            i32.const 300 local.set $n"#,
    );
    let wasm = wat::parse_str(&wat).expect("wat");
    let stats = support::check(&support::engine(), &wasm).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.unwinds > 0, "stress mode never unwound");
}

/// A function `digits` that writes the digits of its parameter below
/// address 64, one per iteration of a loop whose body is `body` (with the
/// parameter in `$x`, an i64 when `wide`), and returns how many it wrote;
/// `main` calls it in a loop that is not counted.
fn shrinking(wide: bool, body: &str) -> String {
    let t = if wide { "i64" } else { "i32" };
    format!(
        r#"(module
          (memory (export "memory") 1)
          (func $digits (export "digits") (param $x {t}) (result i32)
            (local $p i32) (local $q {t}) (local $c i32)
            i32.const 64
            local.set $p
            (loop $l
              local.get $p i32.const -1 i32.add local.tee $p
              local.get $x {t}.const 10 {t}.rem_u {wrap} i32.const 48 i32.or
              i32.store8
              {body})
            i32.const 64 local.get $p i32.sub)
          (func $main (export "main") (param $n i32) (result i32)
            (local $t i32)
            (loop $o
              local.get $t
              local.get $n {extend}
              call $digits
              i32.add
              local.set $t
              local.get $n i32.const 1 i32.sub local.tee $n
              br_if $o)
            local.get $t))"#,
        wrap = if wide { "i32.wrap_i64" } else { "" },
        extend = if wide { "i64.extend_i32_u" } else { "" },
    )
}

/// Division by ten as clang emits it for `while (y >= 10) y /= 10`: the
/// test reads the counter before the step, through temporaries.
const DIV_TEST_BEFORE: &str = "local.get $x i32.const 10 i32.div_u local.set $q \
     local.get $x i32.const 9 i32.gt_u local.set $c \
     local.get $q local.set $x \
     local.get $c br_if $l";

#[test]
fn a_counter_shifted_or_divided_towards_zero_needs_no_check() {
    for (why, wide, body) in [
        ("i32 divided by ten, tested before", false, DIV_TEST_BEFORE),
        (
            "i64 shifted by four, tested after",
            true,
            "local.get $x i64.const 4 i64.shr_u local.tee $x i64.const 0 i64.ne br_if $l",
        ),
        (
            "i64 divided by ten, tested as nonzero after",
            true,
            "local.get $x i64.const 10 i64.div_u local.tee $x i32.wrap_i64 drop local.get $x i64.eqz i32.eqz drop \
             local.get $x i64.const 0 i64.gt_u br_if $l",
        ),
        ("i32 shifted by one, tested bare", false, "local.get $x i32.const 1 i32.shr_u local.tee $x br_if $l"),
    ] {
        let meta = metadata(&shrinking(wide, body));
        assert_eq!(kinds(&meta, 0), None, "{why}: digits is left alone");
        assert_eq!(kinds(&meta, 1), Some(vec![ResumeKind::Loop]), "{why}: calling digits is no resume point");
    }
}

/// Steps that do not reach zero, tests that hold at zero, a counter written
/// twice or in a nested block, control flow before the back edge, and 65
/// steps of one bit each all keep the check.
#[test]
fn counters_that_need_not_reach_zero_keep_the_check() {
    for (why, wide, body) in [
        ("a signed shift stays at -1", false, "local.get $x i32.const 1 i32.shr_s local.tee $x br_if $l"),
        ("a shift by the width is no shift", false, "local.get $x i32.const 32 i32.shr_u local.tee $x br_if $l"),
        ("a division by one", false, "local.get $x i32.const 1 i32.div_u local.tee $x br_if $l"),
        ("a test that holds at zero", false, "local.get $x i32.const 10 i32.div_u local.tee $x i32.const 5 i32.lt_u br_if $l"),
        (
            "the counter grows back",
            false,
            "local.get $x i32.const 10 i32.div_u i32.const 7 i32.add local.tee $x br_if $l",
        ),
        (
            "the test reads another local",
            false,
            "local.get $x i32.const 10 i32.div_u local.set $x local.get $q br_if $l",
        ),
        (
            "the step is written in an if",
            false,
            "local.get $x (if (then local.get $x i32.const 10 i32.div_u local.set $x)) local.get $x br_if $l",
        ),
        (
            "a second write after the step",
            false,
            "local.get $x i32.const 10 i32.div_u local.set $x local.get $q local.set $x local.get $x br_if $l",
        ),
        ("65 runs of one bit", true, "local.get $x i64.const 1 i64.shr_u local.set $q local.get $x local.get $q local.set $x i64.const 0 i64.ne br_if $l"),
    ] {
        let meta = metadata(&shrinking(wide, body));
        assert_eq!(kinds(&meta, 0), Some(vec![ResumeKind::Loop]), "{why}");
    }
}

/// The shrinking loops run the same instrumented, under every stress mode
/// of the differential harness.
#[test]
fn shrinking_loops_run_the_same_under_stress() {
    check_under_stress(&shrinking(false, DIV_TEST_BEFORE));
}
