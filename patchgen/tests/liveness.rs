//! Liveness of wasm locals at code offsets: one hand-written function per
//! control shape, a C function compiled by the real toolchain, and the
//! errors for offsets and functions that do not exist.

mod support;

use upstare_patchgen::liveness::{live_at, live_at_many, Error};
use wasmparser::{KnownCustom, Name, Operator, Parser, Payload};

/// The instructions of defined function `func` with their offsets relative
/// to the code section payload, found by scanning the module.
fn ops(wasm: &[u8], func: u32) -> Vec<(u32, Operator<'_>)> {
    let mut imported = 0;
    let mut index = 0;
    let mut code_start = 0;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.unwrap() {
            Payload::ImportSection(r) => {
                imported +=
                    r.into_imports().filter(|i| matches!(i.as_ref().unwrap().ty, wasmparser::TypeRef::Func(_))).count()
                        as u32;
            }
            Payload::CodeSectionStart { range, .. } => code_start = range.start,
            Payload::CodeSectionEntry(body) => {
                if imported + index == func {
                    let mut reader = body.get_operators_reader().unwrap();
                    let mut out = Vec::new();
                    while !reader.eof() {
                        let (op, at) = reader.read_with_offset().unwrap();
                        out.push(((at - code_start) as u32, op));
                    }
                    return out;
                }
                index += 1;
            }
            _ => {}
        }
    }
    panic!("function {func} has no body");
}

fn imported_functions(wasm: &[u8]) -> u32 {
    let mut count = 0;
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::ImportSection(r) = payload.unwrap() {
            let funcs = r.into_imports().filter(|i| matches!(i.as_ref().unwrap().ty, wasmparser::TypeRef::Func(_)));
            count += funcs.count() as u32;
        }
    }
    count
}

/// Offset of the `nth` instruction of `func` for which `pick` holds.
fn offset_of(wasm: &[u8], func: u32, nth: usize, pick: impl Fn(&Operator) -> bool) -> u32 {
    ops(wasm, func).into_iter().filter(|(_, op)| pick(op)).nth(nth).expect("no such instruction").0
}

/// Indices of the locals `live` marks live.
fn live_set(live: &[bool]) -> Vec<u32> {
    (0..live.len() as u32).filter(|&l| live[l as usize]).collect()
}

fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap()
}

#[test]
fn straight_line_reads_and_writes() {
    let wasm = wat(r#"(module (func (param i32) (local i32 i32)
        local.get 0
        local.set 1
        local.get 1
        local.get 2
        i32.add
        drop))"#);
    let first = offset_of(&wasm, 0, 0, |_| true);
    // 1 is written before its read; 2 is read and never written.
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0, 2]);
    let read1 = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::LocalGet { local_index: 1 }));
    assert_eq!(live_set(&live_at(&wasm, 0, read1).unwrap()), [1, 2]);
    let end = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::End));
    assert_eq!(live_at(&wasm, 0, end).unwrap(), [false; 3]);
}

#[test]
fn tee_writes_after_reading_the_stack() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32)
        local.get 0
        local.tee 1
        local.get 1
        i32.add))"#);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0]);
}

const LOOP: &str = r#"(module (func (param i32) (result i32) (local i32 i32)
    i32.const 0
    local.set 1
    loop $l
      local.get 1
      i32.const 3
      i32.mul
      local.set 2
      local.get 0
      local.set 1
      local.get 0
      i32.const 1
      i32.sub
      local.tee 0
      br_if $l
    end
    local.get 2))"#;

#[test]
fn loop_header_sees_reads_of_the_next_iteration() {
    let wasm = wat(LOOP);
    let header = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::Loop { .. }));
    // 2 is written in every iteration before the read after the loop.
    assert_eq!(live_set(&live_at(&wasm, 0, header).unwrap()), [0, 1]);
    // After `local.set 1`, 1 is read again only through the back edge, and
    // 2 only after the loop.
    let decrement = offset_of(&wasm, 0, 1, |op| matches!(op, Operator::LocalGet { local_index: 0 }));
    assert_eq!(live_set(&live_at(&wasm, 0, decrement).unwrap()), [0, 1, 2]);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0]);
}

#[test]
fn local_written_in_one_arm_only_stays_live() {
    let wasm = wat(r#"(module
      (func (param i32) (result i32) (local i32 i32)
        local.get 0
        if
          i32.const 1
          local.set 1
          i32.const 2
          local.set 2
        else
          i32.const 3
          local.set 2
        end
        local.get 1
        local.get 2
        i32.add)
      (func (param i32) (result i32) (local i32)
        local.get 0
        if
          i32.const 1
          local.set 1
        end
        local.get 1))"#);
    let at_if = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::If { .. }));
    // Both arms write 2; only the `then` arm writes 1.
    assert_eq!(live_set(&live_at(&wasm, 0, at_if).unwrap()), [1]);
    let at_else = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::Else));
    assert_eq!(live_set(&live_at(&wasm, 0, at_else).unwrap()), [1, 2]);
    let no_else = offset_of(&wasm, 1, 0, |op| matches!(op, Operator::If { .. }));
    assert_eq!(live_set(&live_at(&wasm, 1, no_else).unwrap()), [1]);
}

#[test]
fn br_table_reaches_each_target_and_nothing_else() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32 i32 i32)
        block $a
          block $b
            block $c
              local.get 0
              br_table $b $c $b
            end
            local.get 1
            return
          end
          local.get 2
          return
        end
        local.get 3))"#);
    let table = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::BrTable { .. }));
    // $a is no target and everything before its end returns.
    assert_eq!(live_set(&live_at(&wasm, 0, table).unwrap()), [1, 2]);
}

#[test]
fn code_after_a_branch_is_not_a_successor() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32 i32)
        block
          local.get 0
          br_if 0
          unreachable
          local.get 1
          drop
        end
        block
          br 0
          local.get 2
          drop
        end
        i32.const 0))"#);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0]);
    // The unreachable code itself still reads what it reads.
    let dead_read = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::LocalGet { local_index: 2 }));
    assert_eq!(live_set(&live_at(&wasm, 0, dead_read).unwrap()), [2]);
}

#[test]
fn exception_handling_makes_everything_live() {
    let wasm = wat(r#"(module (tag $e) (func (param i32) (local i32)
        i32.const 1
        local.set 1
        block
          try_table (catch_all 0)
            throw $e
          end
        end))"#);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_at(&wasm, 0, first).unwrap(), [true, true]);
}

#[test]
fn many_offsets_agree_with_one_at_a_time() {
    let wasm = wat(LOOP);
    let offsets: Vec<u32> = ops(&wasm, 0).iter().map(|(at, _)| *at).collect();
    let many = live_at_many(&wasm, 0, &offsets).unwrap();
    assert_eq!(many.len(), offsets.len());
    for (at, live) in offsets.iter().zip(&many) {
        assert_eq!(&live_at(&wasm, 0, *at).unwrap(), live, "at {at:#x}");
    }
}

#[test]
fn offsets_and_functions_that_do_not_exist_are_refused() {
    let wasm = wat(r#"(module
      (import "env" "f" (func))
      (func (param i32) (result i32) local.get 0 i32.const 1000 i32.add)
      (func))"#);
    let constant = offset_of(&wasm, 1, 0, |op| matches!(op, Operator::I32Const { .. }));
    assert!(matches!(live_at(&wasm, 1, constant + 1), Err(Error::NotAnInstruction { .. })));
    let other = offset_of(&wasm, 2, 0, |_| true);
    assert!(matches!(live_at(&wasm, 1, other), Err(Error::NotAnInstruction { .. })));
    assert!(matches!(live_at(&wasm, 0, 0), Err(Error::Imported { func: 0, imported: 1 })));
    assert!(matches!(live_at(&wasm, 3, 0), Err(Error::NoSuchFunction { func: 3, total: 3 })));
    assert!(matches!(live_at(&wasm[..wasm.len() - 3], 2, other), Err(Error::Parse(_))));
    let message = live_at(&wasm, 1, constant + 1).unwrap_err().to_string();
    assert!(message.contains(&format!("{:#x}", constant + 1)), "{message}");
    // Imports and no code section at all: still the import named.
    let bodiless = wat(r#"(module (import "env" "f" (func)) (import "env" "g" (func)))"#);
    assert!(matches!(live_at(&bodiless, 1, 0), Err(Error::Imported { func: 1, imported: 2 })));
    assert!(matches!(live_at(&bodiless, 2, 0), Err(Error::NoSuchFunction { func: 2, total: 2 })));
    // A component is named as one, not as a parse failure.
    let component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    assert!(matches!(live_at(&component, 0, 0), Err(Error::Component)));
    // A body whose type index names no type: the offset named is the
    // body's own in the code section (after the entry count and its size).
    let mut bad = wat("(module (type (func)) (func (type 0)))");
    let function_section = bad.windows(3).position(|w| w == [0x03, 0x02, 0x01]).expect("the function section");
    bad[function_section + 3] = 7;
    match live_at(&bad, 0, 0) {
        Err(Error::Malformed { func: 0, offset, .. }) => assert_eq!(offset, 2),
        other => panic!("{other:?}"),
    }
}

/// Index of the function named `name` in the module's name section.
fn function_named(wasm: &[u8], name: &str) -> u32 {
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::CustomSection(c) = payload.unwrap() {
            if let KnownCustom::Name(reader) = c.as_known() {
                for sub in reader {
                    if let Name::Function(map) = sub.unwrap() {
                        for naming in map {
                            let naming = naming.unwrap();
                            if naming.name == name {
                                return naming.index;
                            }
                        }
                    }
                }
            }
        }
    }
    panic!("no function named {name}");
}

#[test]
fn c_variable_used_after_a_call_is_live_at_the_call() {
    let wasm = support::build_c(
        "liveness_call",
        r#"
        volatile int sink;
        int shared;
        __attribute__((noinline)) int work(int x) { sink = x; shared = x; return sink; }
        /* `shared` must be loaded before `work` changes it, so its value
           crosses the call in a local; `a` is dead after the call. */
        __attribute__((noinline)) int mix(int a, int b) {
            int keep = shared * b;
            int r = work(a);
            return r * keep + (keep >> 3);
        }
        int main(int argc, char **argv) { return mix(argc, argc + 1) & 1; }
        "#,
        &[],
    );
    let mix = function_named(&wasm, "mix");
    let work = function_named(&wasm, "work");
    let body = ops(&wasm, mix);
    let call = body
        .iter()
        .position(|(_, op)| matches!(op, Operator::Call { function_index } if *function_index == work))
        .expect("mix calls work");
    // The code after the call is straight-line: what it reads before writing
    // is exactly what must be live.
    let mut read_after = Vec::new();
    let mut written_after = Vec::new();
    for (_, op) in &body[call + 1..] {
        assert!(!matches!(op, Operator::Br { .. } | Operator::BrIf { .. } | Operator::If { .. }));
        match *op {
            Operator::LocalGet { local_index } if !written_after.contains(&local_index) => read_after.push(local_index),
            Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => written_after.push(local_index),
            _ => {}
        }
    }
    assert!(!read_after.is_empty(), "clang kept `keep` on the operand stack; the test needs a local");
    let live = live_at(&wasm, mix, body[call].0).unwrap();
    for l in &read_after {
        assert!(live[*l as usize], "local {l} is read after the call");
    }
    let dead: Vec<u32> = (0..live.len() as u32).filter(|l| !read_after.contains(l)).collect();
    assert!(!dead.is_empty(), "every local of mix is read after the call");
    for l in dead {
        assert!(!live[l as usize], "local {l} is not read after the call");
    }
}

/// Whether `op` can send control anywhere but the next instruction.
fn is_control(op: &Operator) -> bool {
    matches!(
        op,
        Operator::Block { .. }
            | Operator::Loop { .. }
            | Operator::If { .. }
            | Operator::Else
            | Operator::End
            | Operator::Br { .. }
            | Operator::BrIf { .. }
            | Operator::BrTable { .. }
            | Operator::Return
            | Operator::Unreachable
            | Operator::ReturnCall { .. }
            | Operator::ReturnCallIndirect { .. }
    )
}

#[test]
fn every_function_of_a_real_guest_is_consistent_instruction_by_instruction() {
    let wasm = support::build_example("kv-server", "liveness_kv", &[]);
    let imported = imported_functions(&wasm);
    let mut defined = 0;
    for payload in Parser::new(0).parse_all(&wasm) {
        if let Payload::FunctionSection(r) = payload.unwrap() {
            defined = r.count();
        }
    }
    let mut checked = 0;
    for func in imported..imported + defined {
        let body = ops(&wasm, func);
        let offsets: Vec<u32> = body.iter().map(|(at, _)| *at).collect();
        let live = live_at_many(&wasm, func, &offsets).unwrap();
        assert!(live.last().unwrap().iter().all(|l| !l), "function {func}: live at its final end");
        for (i, (at, op)) in body.iter().enumerate() {
            match *op {
                Operator::LocalGet { local_index } => assert!(live[i][local_index as usize], "{func} at {at:#x}"),
                Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                    assert!(!live[i][local_index as usize], "{func} at {at:#x}")
                }
                _ => {}
            }
            // Across an instruction that only falls through, liveness
            // changes only by what it reads or writes.
            if !is_control(op) {
                let mut expected = live[i + 1].clone();
                match *op {
                    Operator::LocalGet { local_index } => expected[local_index as usize] = true,
                    Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                        expected[local_index as usize] = false
                    }
                    _ => {}
                }
                assert_eq!(live[i], expected, "function {func} at {at:#x}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
}

#[test]
fn if_else_join_where_only_one_arm_reads() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32 i32)
        local.get 0
        if
          local.get 1
          local.set 2
        else
          nop
        end
        local.get 2))"#);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0, 1, 2]);
    // Either arm may run: the `then` arm reads 1, the `else` arm lets the
    // read of 2 after the join through.
    let at_if = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::If { .. }));
    assert_eq!(live_set(&live_at(&wasm, 0, at_if).unwrap()), [1, 2]);
    let then_arm = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::LocalGet { local_index: 1 }));
    assert_eq!(live_set(&live_at(&wasm, 0, then_arm).unwrap()), [1]);
    let else_arm = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::Nop));
    assert_eq!(live_set(&live_at(&wasm, 0, else_arm).unwrap()), [2]);
}

#[test]
fn br_if_to_an_outer_block_skips_the_inner_join() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32 i32)
        block $out
          block $in
            local.get 0
            br_if $out
            local.get 1
            drop
          end
          i32.const 0
          local.set 2
        end
        local.get 1
        local.get 2
        i32.add))"#);
    // Taken, the branch lands after $out, where 2 is read unwritten;
    // through $in's end 2 would be written first.
    let br = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::BrIf { .. }));
    assert_eq!(live_set(&live_at(&wasm, 0, br).unwrap()), [1, 2]);
    let after_in = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::I32Const { .. }));
    assert_eq!(live_set(&live_at(&wasm, 0, after_in).unwrap()), [1]);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0, 1, 2]);
}

#[test]
fn loop_carries_values_around_its_back_edge() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32 i32)
        i32.const 5
        local.set 1
        loop $l
          local.get 2
          drop
          local.get 0
          local.set 2
          local.get 0
          i32.const 1
          i32.sub
          local.tee 0
          br_if $l
        end
        local.get 1))"#);
    // 2 is read at the top of the next iteration, 1 after the loop: both
    // live at the back edge; 0 is read again around it.
    let br = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::BrIf { .. }));
    assert_eq!(live_set(&live_at(&wasm, 0, br).unwrap()), [0, 1, 2]);
    // Just before 2 is written its old value is dead.
    let before_write = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::LocalGet { local_index: 0 }));
    assert_eq!(live_set(&live_at(&wasm, 0, before_write).unwrap()), [0, 1]);
    let header = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::Loop { .. }));
    assert_eq!(live_set(&live_at(&wasm, 0, header).unwrap()), [0, 1, 2]);
    let first = offset_of(&wasm, 0, 0, |_| true);
    assert_eq!(live_set(&live_at(&wasm, 0, first).unwrap()), [0, 2]);
}

#[test]
fn br_table_to_a_loop_and_an_outer_block() {
    let wasm = wat(r#"(module (func (param i32) (result i32) (local i32 i32 i32)
        block $exit
          loop $top
            local.get 1
            drop
            local.get 0
            br_table $top $exit
            local.get 3
            drop
          end
        end
        local.get 2))"#);
    // The loop's top reads 1 and 0, the exit reads 2; the code after the
    // table is no successor, so 3 stays dead.
    let table = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::BrTable { .. }));
    assert_eq!(live_set(&live_at(&wasm, 0, table).unwrap()), [0, 1, 2]);
    let exit = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::LocalGet { local_index: 2 }));
    assert_eq!(live_set(&live_at(&wasm, 0, exit).unwrap()), [2]);
    let top = offset_of(&wasm, 0, 0, |op| matches!(op, Operator::LocalGet { local_index: 1 }));
    assert_eq!(live_set(&live_at(&wasm, 0, top).unwrap()), [0, 1, 2]);
}
