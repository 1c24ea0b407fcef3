//! Where a guest's compile goes, function by function: the instructions
//! wasmtime spends on each function of the original module and of the
//! instrumented one (unwind-only, as the host loads it), counted under
//! callgrind.
//!
//! For each module it writes one copy per defined function, in which every
//! other body is `unreachable`, and a copy with no body kept at all; this
//! bench then runs itself under callgrind compiling the copies in order
//! (`--compile-each DIR`), with a dump before each compile, so that each
//! dump is one compile. A function's cost is its copy's less the no-body
//! copy's; the no-body copy is what the module costs besides its bodies
//! (one compiled unit per function, the trampolines of its types and
//! exports). The parts add up to a little more than one compile of the
//! whole module.
//!
//! `cargo bench -p upstare-benches --bench compile_functions [-- NAME]`
//! (NAME: compute, nbody (the default), interp or kernels). Needs valgrind.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::CGuest;
use wasm_encoder::{CodeSection, Function, Instruction, Module, RawSection};

/// Called before each compile of `--compile-each`: callgrind dumps its
/// counts there (`--dump-before`).
#[inline(never)]
#[no_mangle]
pub extern "C" fn upstare_bench_compile_marker(i: usize) -> usize {
    std::hint::black_box(i)
}

/// `--compile-each DIR`: compiles every module in `DIR`, in name order.
fn compile_each(dir: &str) {
    let engine = upstare_host::new_engine().expect("engine");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).expect("the copies").map(|e| e.expect("entry").path()).collect();
    files.sort();
    for (i, f) in files.iter().enumerate() {
        let wasm = std::fs::read(f).expect("a copy");
        upstare_bench_compile_marker(i);
        wasmtime::Module::new(&engine, &wasm).expect("the copy compiles");
    }
    upstare_bench_compile_marker(files.len());
}

/// `wasm` with the body of defined function `keep` only (none if `None`);
/// every other body is `unreachable`, valid for any type.
fn keeping(wasm: &[u8], keep: Option<usize>) -> Vec<u8> {
    let mut module = Module::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.expect("a valid module");
        if let wasmparser::Payload::CodeSectionStart { range, .. } = &payload {
            let reader = wasmparser::BinaryReader::new(&wasm[range.clone()], range.start);
            let mut code = CodeSection::new();
            for (i, body) in wasmparser::CodeSectionReader::new(reader).expect("code").into_iter().enumerate() {
                let body = body.expect("a body");
                if Some(i) == keep {
                    code.raw(&wasm[body.range()]);
                } else {
                    let mut f = Function::new([]);
                    f.instruction(&Instruction::Unreachable).instruction(&Instruction::End);
                    code.function(&f);
                }
            }
            module.section(&code);
        } else if let Some((id, range)) = payload.as_section() {
            // Code entries come as sections of their own: the code section
            // was written whole above.
            if id != wasm_encoder::SectionId::Code as u8 {
                module.section(&RawSection { id, data: &wasm[range] });
            }
        }
    }
    module.finish()
}

/// The defined functions' names, by defined index (from the name section).
fn names(wasm: &[u8]) -> (usize, HashMap<usize, String>) {
    let (mut imported, mut defined, mut names) = (0, 0, HashMap::new());
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.expect("a valid module") {
            wasmparser::Payload::ImportSection(r) => {
                let is_func = |t: &wasmparser::TypeRef| matches!(t, wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_));
                for group in r {
                    imported += match group.expect("an import") {
                        wasmparser::Imports::Single(_, i) => usize::from(is_func(&i.ty)),
                        wasmparser::Imports::Compact1 { items, .. } => items.into_iter().filter(|i| i.as_ref().is_ok_and(|i| is_func(&i.ty))).count(),
                        wasmparser::Imports::Compact2 { ty, names, .. } => if is_func(&ty) { names.into_iter().count() } else { 0 },
                    };
                }
            }
            wasmparser::Payload::CodeSectionStart { count, .. } => defined = count as usize,
            wasmparser::Payload::CustomSection(c) => {
                if let wasmparser::KnownCustom::Name(reader) = c.as_known() {
                    for sub in reader.flatten() {
                        if let wasmparser::Name::Function(map) = sub {
                            for n in map.into_iter().flatten() {
                                if let Some(d) = (n.index as usize).checked_sub(imported) {
                                    names.insert(d, n.name.to_string());
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (defined, names)
}

/// The instructions of compiling each copy in `dir` (in name order),
/// counted by this bench under callgrind.
fn compile_counts(dir: &Path, copies: usize) -> Vec<u64> {
    let out = dir.with_extension("callgrind");
    let me = std::env::current_exe().expect("the bench's own path");
    let mut counted = Command::new("valgrind");
    counted.args(["--tool=callgrind", "--dump-before=upstare_bench_compile_marker"]);
    counted.arg(format!("--callgrind-out-file={}", out.display())).arg(&me).arg("--compile-each").arg(dir);
    counted.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    common::run(&mut counted);
    // Dump k+1 holds what ran between marker k-1 and marker k: compile k-1.
    (2..copies + 2)
        .map(|part| {
            let file = PathBuf::from(format!("{}.{part}", out.display()));
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            let total = text.lines().find_map(|l| l.strip_prefix("totals:")).and_then(|n| n.trim().parse().ok());
            let _ = std::fs::remove_file(&file);
            total.unwrap_or_else(|| panic!("no totals in {}", file.display()))
        })
        .collect()
}

/// Each defined function's compile, then the no-body copy's, in
/// instructions.
fn per_function(wasm: &[u8], dir: &Path) -> (Vec<u64>, u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (defined, _) = names(wasm);
    // Name order: the no-body copy first, then the functions in order.
    std::fs::write(dir.join("00000.wasm"), keeping(wasm, None)).unwrap();
    for f in 0..defined {
        std::fs::write(dir.join(format!("{:05}.wasm", f + 1)), keeping(wasm, Some(f))).unwrap();
    }
    let counts = compile_counts(dir, defined + 1);
    let base = counts[0];
    (counts[1..].iter().map(|c| c.saturating_sub(base)).collect(), base)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, dir, ..] = &args[..] {
        if mode == "--compile-each" {
            return compile_each(dir);
        }
    }
    let name = args.iter().find(|a| !a.starts_with("--")).map_or("nbody", String::as_str);
    let Some(&(_, source)) = common::CPU_GUESTS.iter().find(|(n, _)| *n == name) else {
        panic!("unknown guest {name}: compute, nbody, interp or kernels");
    };
    common::require_valgrind();

    let original = std::fs::read(CGuest::single(name, source).build()).unwrap();
    let instrumented = common::unwind_only(&original);
    let scratch = common::out_dir().join("compile-functions");
    let (o, o_base) = per_function(&original, &scratch.join("original"));
    let (u, u_base) = per_function(&instrumented, &scratch.join("upstare"));
    let _ = std::fs::remove_dir_all(&scratch);

    let (_, fnames) = names(&instrumented);
    let m = |n: u64| n as f64 / 1e6;
    println!("{name}: compile instructions per function (callgrind), millions; upstare = the unwind-only variant");
    println!("{:<40} {:>9} {:>9} {:>9}", "function", "original", "upstare", "added");
    println!("{:<40} {:>9.1} {:>9.1} {:>9.1}", "(the module with no bodies)", m(o_base), m(u_base), m(u_base) - m(o_base));
    let mut rows: Vec<(usize, u64, u64)> = (0..o.len()).map(|f| (f, o[f], u[f])).collect();
    rows.sort_by_key(|&(_, a, b)| std::cmp::Reverse(b as i64 - a as i64));
    for &(f, a, b) in rows.iter().take(20) {
        let label = fnames.get(&f).cloned().unwrap_or_else(|| format!("defined function {f}"));
        println!("{label:<40} {:>9.1} {:>9.1} {:>9.1}", m(a), m(b), m(b) - m(a));
    }
    let (orig_sum, same_sum): (u64, u64) = (o.iter().sum(), u[..o.len()].iter().sum());
    let helpers: u64 = u[o.len()..].iter().sum();
    println!("{:<40} {:>9.1} {:>9.1} {:>9.1}", format!("all {} original functions", o.len()), m(orig_sum), m(same_sum), m(same_sum) - m(orig_sum));
    println!("{:<40} {:>9} {:>9.1} {:>9.1}", format!("the {} added helpers", u.len() - o.len()), "", m(helpers), m(helpers));
    let (total_o, total_u) = (o_base + orig_sum, u_base + same_sum + helpers);
    println!("{:<40} {:>9.1} {:>9.1} {:>8.3}x", "sum", m(total_o), m(total_u), total_u as f64 / total_o as f64);
}
