//! Loads and stores through a shared program memory against a plain one.
//!
//! The host gives every instrumented program a `SharedMemory` (the next
//! version's fresh store imports the same one). This measures what that
//! costs the program's own memory accesses: the same kernel (a byte
//! histogram over a buffer, then a prefix sum over 32-bit words, both
//! load- and store-heavy) compiled twice by the same engine, importing its
//! memory once shared and once not, interleaved, median of the rounds.
//!
//! `cargo bench -p upstare-benches --bench memory [-- ROUNDS]` (default 15).

use std::time::{Duration, Instant};

use wasmtime::{Engine, Instance, Memory, MemoryType, Module, SharedMemory, Store};

const PAGES: u32 = 256; // 16 MiB

fn kernel(shared: bool) -> String {
    let memory = if shared { format!("(memory {PAGES} {PAGES} shared)") } else { format!("(memory {PAGES} {PAGES})") };
    format!(
        r#"(module
  (import "host" "memory" {memory})
  (func (export "run") (param $iterations i32) (result i32)
    (local $i i32) (local $acc i32) (local $byte i32)
    (loop $outer
      ;; histogram of the bytes of the first 8 MiB into 256 counters at 8 MiB
      (local.set $i (i32.const 0))
      (loop $hist
        (local.set $byte (i32.load8_u (local.get $i)))
        (i32.store (i32.add (i32.const 0x800000) (i32.shl (local.get $byte) (i32.const 2)))
          (i32.add (i32.load (i32.add (i32.const 0x800000) (i32.shl (local.get $byte) (i32.const 2))))
                   (i32.const 1)))
        (i32.store8 (local.get $i) (i32.add (local.get $byte) (local.get $i)))
        (br_if $hist (i32.lt_u (local.tee $i (i32.add (local.get $i) (i32.const 1))) (i32.const 0x800000))))
      ;; prefix sum over the 32-bit words of the second 8 MiB
      (local.set $i (i32.const 0x800400))
      (local.set $acc (i32.const 0))
      (loop $scan
        (local.set $acc (i32.add (local.get $acc) (i32.load (local.get $i))))
        (i32.store (local.get $i) (local.get $acc))
        (br_if $scan (i32.lt_u (local.tee $i (i32.add (local.get $i) (i32.const 4))) (i32.const 0x1000000))))
      (local.set $iterations (i32.sub (local.get $iterations) (i32.const 1)))
      (br_if $outer (local.get $iterations)))
    (local.get $acc)))"#
    )
}

struct Variant {
    store: Store<()>,
    run: wasmtime::TypedFunc<i32, i32>,
}

fn instantiate(engine: &Engine, shared: bool) -> Variant {
    let module = Module::new(engine, wat::parse_str(kernel(shared)).unwrap()).unwrap();
    let mut store = Store::new(engine, ());
    let memory: wasmtime::Extern = if shared {
        SharedMemory::new(engine, MemoryType::shared(PAGES, PAGES)).unwrap().into()
    } else {
        Memory::new(&mut store, MemoryType::new(PAGES, Some(PAGES))).unwrap().into()
    };
    let instance = Instance::new(&mut store, &module, &[memory]).unwrap();
    let run = instance.get_typed_func::<i32, i32>(&mut store, "run").unwrap();
    Variant { store, run }
}

fn time(v: &mut Variant) -> Duration {
    let started = Instant::now();
    std::hint::black_box(v.run.call(&mut v.store, 4).unwrap());
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(15);
    // The engine the host uses, so both variants compile as guests do.
    let engine = upstare_host::new_engine().unwrap();
    let mut plain = instantiate(&engine, false);
    let mut shared = instantiate(&engine, true);
    let (mut p, mut s) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        p.push(time(&mut plain));
        s.push(time(&mut shared));
    }
    let (p, s) = (median(p), median(s));
    println!("{rounds} interleaved rounds, median");
    println!("plain memory:  {:>8.2} ms", p.as_secs_f64() * 1e3);
    println!("shared memory: {:>8.2} ms  ({:.3}x)", s.as_secs_f64() * 1e3, s.as_secs_f64() / p.as_secs_f64());
}
