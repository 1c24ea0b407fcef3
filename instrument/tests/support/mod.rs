//! The differential harness: runs a module as it is and instrumented under
//! wasmtime, and records everything the program can observe, so the two runs
//! can be compared.
//!
//! The instrumented module is driven the way a host drives it (see the crate
//! docs): program and control memories created by the host, data applied by
//! `upstare_init_memory`, the start function called through `upstare_start`.
//! In stress mode every export call is repeated through unwinds and rewinds
//! until it returns normally, and every unwound frame stack is read back and
//! typed against the metadata on the way.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use upstare_instrument::abi::{self, control, exports, ResumeKind, State};
use upstare_instrument::{Instrumented, Metadata, Options};
use wasmtime::{
    Caller, Config, Engine, Extern, Func, Instance, Linker, Memory, MemoryType, Module, SharedMemory,
    Store, StoreLimits, StoreLimitsBuilder, Trap, Val, ValType,
};

/// The imports random modules may use, with host implementations below.
/// `env.block` is marked blocking. Only the differential test makes random
/// modules; the others share the harness.
#[allow(dead_code)]
pub const AVAILABLE_IMPORTS: &str = r#"
    (module
      (import "env" "work" (func (param i32) (result i32)))
      (import "env" "block" (func (param i32) (result i32)))
      (import "env" "block2" (func (param i64 f32) (result i32 i64)))
    )
"#;

/// Instrumenter options matching [`AVAILABLE_IMPORTS`].
pub fn options() -> Options {
    let mut o = Options::default();
    o.blocking.insert(("env".into(), "block".into()));
    o.blocking.insert(("env".into(), "block2".into()));
    o
}

const WASM_STACK: usize = 16 << 20;

/// One engine for every run: the instrumented module needs multi-memory and
/// a shared control memory.
pub fn engine() -> Engine {
    let mut c = Config::new();
    c.wasm_multi_memory(true)
        .wasm_threads(true)
        .shared_memory(true)
        .wasm_bulk_memory(true)
        .wasm_multi_value(true)
        // Instrumented frames are larger (shadow locals), so give both runs
        // room for the deepest recursion the fuel allows; `check` runs on a
        // thread whose native stack is larger still.
        .max_wasm_stack(WASM_STACK)
        .async_stack_size(2 * WASM_STACK);
    Engine::new(&c).expect("engine")
}

/// A value as the comparison sees it: floats by bits with every NaN alike;
/// a function reference by the export name of the function it refers to
/// (the same in both instances, whose identities differ); an external
/// reference by null-ness (the host makes none).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum V {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
    /// `None` for null; `Some("")` for a function no export names.
    Func(Option<String>),
    Extern { null: bool },
    Other(String),
}

/// The export name of each exported function of an instance, by the
/// function's identity in its store.
pub struct FuncNames(HashMap<usize, String>);

impl FuncNames {
    fn of(store: &mut Store<Host>, instance: &Instance, ex: &Exports) -> Self {
        let mut names = HashMap::new();
        for (name, _) in &ex.funcs {
            if let Some(f) = instance.get_func(&mut *store, name) {
                names.entry(f.to_raw(&mut *store) as usize).or_insert_with(|| name.clone());
            }
        }
        FuncNames(names)
    }

    fn name(&self, store: &mut Store<Host>, f: &wasmtime::Func) -> String {
        self.0.get(&(f.to_raw(&mut *store) as usize)).cloned().unwrap_or_default()
    }
}

impl V {
    fn of(v: &Val, store: &mut Store<Host>, funcs: &FuncNames) -> V {
        match v {
            Val::I32(x) => V::I32(*x),
            Val::I64(x) => V::I64(*x),
            Val::F32(x) if f32::from_bits(*x).is_nan() => V::F32(0x7fc0_0000),
            Val::F32(x) => V::F32(*x),
            Val::F64(x) if f64::from_bits(*x).is_nan() => V::F64(0x7ff8_0000_0000_0000),
            Val::F64(x) => V::F64(*x),
            Val::FuncRef(f) => V::Func(f.as_ref().map(|f| funcs.name(store, f))),
            Val::ExternRef(r) => V::Extern { null: r.is_none() },
            other => V::Other(format!("{other:?}")),
        }
    }
}

/// How a call (or the instantiation) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ret {
    Values(Vec<V>),
    /// A trap, by code; `None` for an error that is not a trap.
    Trap(Option<Trap>),
}

fn trap_of(e: &wasmtime::Error) -> Ret {
    Ret::Trap(e.downcast_ref::<Trap>().copied())
}

/// Everything observable about one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Instantiation, data segments and start function.
    pub init: Ret,
    /// Each export call: name, how it ended, a hash of memory and the
    /// exported globals afterwards.
    pub calls: Vec<(String, Ret, u64, Vec<V>)>,
    /// Final contents of the exported memory.
    pub memory: Vec<u8>,
    /// Final values of the exported globals.
    pub globals: Vec<(String, V)>,
    /// Exported tables' elements.
    pub tables: Vec<(String, Vec<V>)>,
    /// Calls of the host imports that did their work.
    pub log: Vec<String>,
}

/// What a module exports, from the original's export section.
struct Exports {
    funcs: Vec<(String, u32)>,
    memories: Vec<String>,
    globals: Vec<String>,
    tables: Vec<String>,
    imported_funcs: u32,
}

fn exports_of(wasm: &[u8]) -> Exports {
    let mut e = Exports { funcs: vec![], memories: vec![], globals: vec![], tables: vec![], imported_funcs: 0 };
    for p in wasmparser::Parser::new(0).parse_all(wasm) {
        match p.expect("parse") {
            wasmparser::Payload::ImportSection(r) => {
                for i in r.into_imports() {
                    if matches!(i.expect("import").ty, wasmparser::TypeRef::Func(_)) {
                        e.imported_funcs += 1;
                    }
                }
            }
            wasmparser::Payload::ExportSection(r) => {
                for x in r {
                    let x = x.expect("export");
                    let name = x.name.to_string();
                    match x.kind {
                        wasmparser::ExternalKind::Func => e.funcs.push((name, x.index)),
                        wasmparser::ExternalKind::Memory => e.memories.push(name),
                        wasmparser::ExternalKind::Global => e.globals.push(name),
                        wasmparser::ExternalKind::Table => e.tables.push(name),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    e
}

/// Store data: resource limits, the import log, and the unwind injection.
pub struct Host {
    limits: StoreLimits,
    log: Vec<String>,
    /// Make every n-th call of a blocking import unwind instead of working.
    inject_every: Option<u32>,
    inject_now: bool,
    /// Request a pause (the host's pause byte) at every n-th call of
    /// `env.work`.
    pause_every: Option<u32>,
    work_calls: u32,
    control: Option<SharedMemory>,
    blocking_calls: u32,
}

/// The most memory a module may have, in bytes: the store's limit for
/// the original's own memory, and the maximum of the shared program memory
/// the instrumented module imports, which no store limits. A `memory.grow`
/// past it fails in both.
const MEMORY_LIMIT: usize = 1 << 24;

/// The program memory an instrumented module imports, with at most
/// [`MEMORY_LIMIT`] bytes (or its minimum, if that is more, as the store
/// would refuse the original's).
fn program_memory(engine: &Engine, meta: &Metadata) -> Result<SharedMemory, String> {
    let limit = (MEMORY_LIMIT / 65536) as u32;
    let max = meta.memory.import_max().min(limit.max(meta.memory.min));
    SharedMemory::new(engine, MemoryType::shared(meta.memory.min, max)).map_err(|e| format!("cannot create the program memory: {e}"))
}

/// A control memory as the host makes one.
fn control_memory(engine: &Engine) -> Result<SharedMemory, String> {
    SharedMemory::new(engine, MemoryType::shared(control::MIN_PAGES as u32, control::MAX_PAGES as u32))
        .map_err(|e| format!("cannot create the control memory: {e}"))
}

fn new_store(engine: &Engine, inject_every: Option<u32>, pause_every: Option<u32>) -> Store<Host> {
    let limits = StoreLimitsBuilder::new().memory_size(MEMORY_LIMIT).table_elements(100_000).instances(10).build();
    let mut store = Store::new(
        engine,
        Host {
            limits,
            log: vec![],
            inject_every,
            inject_now: false,
            blocking_calls: 0,
            pause_every,
            work_calls: 0,
            control: None,
        },
    );
    store.limiter(|h| &mut h.limits);
    store
}

/// For a blocking import: whether this call is the one that unwinds. It
/// asks the guest to unwind and does no work, as a host interrupting the
/// call would.
fn interrupt(caller: &mut Caller<'_, Host>) -> bool {
    let h = caller.data_mut();
    let Some(n) = h.inject_every else { return false };
    if !h.inject_now {
        return false;
    }
    h.blocking_calls += 1;
    if h.blocking_calls % n != 1 % n {
        return false;
    }
    let state = caller.get_export(exports::STATE).and_then(Extern::into_global).expect("state export");
    state.set(caller, Val::I32(State::Unwinding as i32)).expect("set the state");
    true
}

fn linker(engine: &Engine) -> Linker<Host> {
    let mut l = Linker::new(engine);
    l.func_wrap("env", "work", |mut c: Caller<'_, Host>, x: i32| {
        let h = c.data_mut();
        h.log.push(format!("work({x})"));
        if let (Some(n), true, Some(control)) = (h.pause_every, h.inject_now, &h.control) {
            h.work_calls += 1;
            if h.work_calls.is_multiple_of(n) {
                // SAFETY: the guest is inside this host call, so it is not
                // touching the control memory.
                unsafe { *control.data()[control::PAUSE_BYTE as usize].get() = 1 };
            }
        }
        x.wrapping_mul(31).wrapping_add(7)
    })
    .expect("work");
    l.func_wrap("env", "block", |mut c: Caller<'_, Host>, x: i32| {
        if interrupt(&mut c) {
            return 0;
        }
        c.data_mut().log.push(format!("block({x})"));
        x ^ 0x5a5a
    })
    .expect("block");
    l.func_wrap("env", "block2", |mut c: Caller<'_, Host>, x: i64, y: f32| {
        if interrupt(&mut c) {
            return (0, 0);
        }
        c.data_mut().log.push(format!("block2({x}, {:#x})", y.to_bits()));
        (x as i32 ^ 3, x.wrapping_add(y.to_bits() as i64))
    })
    .expect("block2");
    l
}

/// Deterministic arguments for a function type.
fn args(ty: &wasmtime::FuncType) -> Vec<Val> {
    ty.params()
        .enumerate()
        .map(|(k, t)| {
            let k = k as i32 + 1;
            match t {
                ValType::I32 => Val::I32(k * 7),
                ValType::I64 => Val::I64(k as i64 * -1_000_003),
                ValType::F32 => Val::F32((k as f32 * 1.5).to_bits()),
                ValType::F64 => Val::F64((k as f64 * -2.25).to_bits()),
                t => Val::default_for_ty(&t).expect("defaultable param"),
            }
        })
        .collect()
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// A program memory, shared or not.
#[derive(Clone)]
enum Mem {
    Plain(Memory),
    Shared(SharedMemory),
}

impl Mem {
    fn bytes(&self, store: &Store<Host>) -> Vec<u8> {
        match self {
            Mem::Plain(m) => m.data(store).to_vec(),
            // SAFETY: the guest runs only inside calls on this thread, so
            // nothing writes the memory while the host reads it.
            Mem::Shared(m) => m.data().iter().map(|c| unsafe { *c.get() }).collect(),
        }
    }
}

/// Memory bytes, exported globals, and exported tables' elements.
type Observed = (Vec<u8>, Vec<(String, V)>, Vec<(String, Vec<V>)>);

/// Reads state from a live instance: memory, globals, tables by export name.
fn observe(store: &mut Store<Host>, instance: &Instance, ex: &Exports, memory: Option<Mem>) -> Observed {
    let mem = memory.or_else(|| {
        let name = ex.memories.first()?;
        match instance.get_memory(&mut *store, name) {
            Some(m) => Some(Mem::Plain(m)),
            None => instance.get_shared_memory(&mut *store, name).map(Mem::Shared),
        }
    });
    let bytes = mem.map(|m| m.bytes(store)).unwrap_or_default();
    let funcs = FuncNames::of(store, instance, ex);
    let globals = ex
        .globals
        .iter()
        .map(|n| {
            let g = instance.get_global(&mut *store, n).expect("exported global");
            let value = g.get(&mut *store);
            (n.clone(), V::of(&value, store, &funcs))
        })
        .collect();
    let tables = ex
        .tables
        .iter()
        .map(|n| {
            let t = instance.get_table(&mut *store, n).expect("exported table");
            let size = t.size(&*store);
            let elements = (0..size)
                .map(|i| match t.get(&mut *store, i) {
                    Some(r) => V::of(&r.into(), store, &funcs),
                    None => V::Other("out of bounds".into()),
                })
                .collect();
            (n.clone(), elements)
        })
        .collect();
    (bytes, globals, tables)
}

/// Runs the original module.
pub fn run_original(engine: &Engine, wasm: &[u8]) -> Outcome {
    let module = Module::new(engine, wasm).expect("original compiles");
    let ex = exports_of(wasm);
    let mut store = new_store(engine, None, None);
    let mut outcome = Outcome {
        init: Ret::Values(vec![]),
        calls: vec![],
        memory: vec![],
        globals: vec![],
        tables: vec![],
        log: vec![],
    };
    let instance = match linker(engine).instantiate(&mut store, &module) {
        Ok(i) => i,
        Err(e) => {
            outcome.init = trap_of(&e);
            outcome.log = std::mem::take(&mut store.data_mut().log);
            return outcome;
        }
    };
    for (name, _) in &ex.funcs {
        let f = instance.get_func(&mut store, name).expect("exported func");
        let ty = f.ty(&store);
        let mut results = vec![Val::I32(0); ty.results().len()];
        let ret = match f.call(&mut store, &args(&ty), &mut results) {
            Ok(()) => {
                let funcs = FuncNames::of(&mut store, &instance, &ex);
                Ret::Values(results.iter().map(|v| V::of(v, &mut store, &funcs)).collect())
            }
            Err(e) => trap_of(&e),
        };
        let (mem, globals, _) = observe(&mut store, &instance, &ex, None);
        outcome.calls.push((name.clone(), ret, hash(&mem), globals.into_iter().map(|g| g.1).collect()));
    }
    let (memory, globals, tables) = observe(&mut store, &instance, &ex, None);
    outcome.memory = memory;
    outcome.globals = globals;
    outcome.tables = tables;
    outcome.log = std::mem::take(&mut store.data_mut().log);
    outcome
}

/// How to drive the instrumented module.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// No pauses: the instrumented module must behave like the original.
    Plain,
    /// `Header::stress(period)`, and blocking imports interrupted every
    /// `inject` calls when `inject` is set.
    Stress { period: u32, inject: Option<u32> },
    /// No stress; the host requests a pause at every `every`-th call of
    /// `env.work` and interrupts every `every`-th blocking call.
    Pause { every: u32 },
    /// `Header::stress(period)` on the unwind-only variant, as a host
    /// starts a program: at the first unwind the run moves to an instance
    /// of the full variant over the same memories, with the globals, and
    /// rewinds there.
    Switch { period: u32 },
}

/// What an instrumented run did besides its outcome.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub unwinds: u64,
    pub max_depth: usize,
    /// Runs that moved from the unwind-only variant to the full one.
    pub switched: u64,
    /// Frame slots of locals dead at their point ([`abi::ResumePoint::slots`]),
    /// each checked to hold zero and overwritten before the rewind.
    pub dead_slots: u64,
}

/// Bounds the unwind/rewind cycles of one call: each cycle must make
/// progress, and the module's fuel bounds the progress.
const MAX_CYCLES: u64 = 200_000;

struct Driver<'a> {
    store: Store<Host>,
    instance: Instance,
    program: SharedMemory,
    control: SharedMemory,
    meta: &'a Metadata,
    exports: &'a Exports,
    stats: Stats,
    /// The full variant to move to at the next unwind, for a run that
    /// starts on the unwind-only one ([`Mode::Switch`]).
    next: Option<(&'a Engine, &'a Instrumented)>,
}

impl<'a> Driver<'a> {
    /// An instance of `inst` over a fresh program memory and control
    /// memory (with a fresh header), nothing called yet.
    fn over_fresh_memories(engine: &Engine, inst: &'a Instrumented, exports: &'a Exports) -> Result<Self, String> {
        let meta = &inst.metadata;
        let mut store = new_store(engine, None, None);
        let program = program_memory(engine, meta)?;
        let control = control_memory(engine)?;
        let instance = instantiate_over(engine, &mut store, inst, &program, &control)?;
        store.data_mut().control = Some(control.clone());
        let d = Driver { store, instance, program, control, meta, exports, stats: Stats::default(), next: None };
        d.write_control(0, &control::Header::default().encode());
        Ok(d)
    }

    /// Calls `export(arg)` of the instance, a function of i32 results.
    fn call_i32(&mut self, export: &str, arg: i32) -> Result<Vec<i32>, String> {
        call_i32(&mut self.store, &self.instance, export, arg)
    }

    /// The function of the innermost frame an unwind left, and whether it
    /// stopped at the function's entry.
    fn innermost(&self) -> Result<(u32, bool), String> {
        let frames = abi::read_frames(&self.control_bytes()).map_err(|e| e.to_string())?;
        let frame = frames.first().ok_or("an unwind saved no frame")?;
        let f = self.meta.function(frame.func).ok_or("a frame of no instrumented function")?;
        Ok((frame.func, f.resume_points[frame.resume_point as usize].kind == ResumeKind::Entry))
    }

    fn control_bytes(&self) -> Vec<u8> {
        // SAFETY: no wasm runs while the host reads: calls are synchronous on
        // this thread and nothing else holds the memory.
        self.control.data().iter().map(|c| unsafe { *c.get() }).collect()
    }

    fn write_control(&self, at: usize, bytes: &[u8]) {
        let data = self.control.data();
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: as in `control_bytes`, no wasm runs concurrently.
            unsafe { *data[at + i].get() = *b };
        }
    }

    fn header(&self) -> control::Header {
        control::Header::decode(&self.control_bytes()).expect("header")
    }

    fn state(&mut self) -> i32 {
        let g = self.instance.get_global(&mut self.store, exports::STATE).expect("state export");
        g.get(&mut self.store).i32().expect("i32 state")
    }

    fn set_state(&mut self, state: State) -> Result<(), String> {
        let g = self.instance.get_global(&mut self.store, exports::STATE).ok_or("no state export")?;
        g.set(&mut self.store, Val::I32(state as i32)).map_err(|e| format!("{e:?}"))
    }

    /// Ends an unwind, as a host does before it reads the frames.
    fn stop_unwind(&mut self) -> Result<(), String> {
        self.set_state(State::Normal)
    }

    /// Starts a rewind, as a host does before it calls the entry again.
    fn start_rewind(&mut self) -> Result<(), String> {
        self.write_control(control::REWIND_BYTE as usize, &[1]);
        self.set_state(State::Rewinding)
    }

    /// Puts the run, unwound, on a fresh instance of `full` over the same
    /// memories, with the mutable globals of the one it leaves: what a host
    /// does before the first rewind of a program it started on the
    /// unwind-only variant. The data segments were applied already. The new
    /// instance gets a store of its own, with the host state moved over, as
    /// in the host: wasmtime finds the instance a memory fault belongs to
    /// by its memory, which two instances in one store would share.
    fn move_to(&mut self, engine: &Engine, full: &Instrumented) -> Result<(), String> {
        let mut store = new_store(engine, None, None);
        std::mem::swap(store.data_mut(), self.store.data_mut());
        let instance = instantiate_over(engine, &mut store, full, &self.program, &self.control)?;
        for g in &self.meta.globals {
            let value = self.instance.get_global(&mut self.store, &g.export).ok_or("a global export is missing")?.get(&mut self.store);
            let global = instance.get_global(&mut store, &g.export).ok_or("the full variant lacks a global export")?;
            global.set(&mut store, value).map_err(|e| format!("{e:?}"))?;
        }
        self.store = store;
        self.instance = instance;
        self.helper(exports::DROP_DATA)
    }

    fn helper(&mut self, name: &str) -> Result<(), String> {
        let f = self.instance.get_func(&mut self.store, name).ok_or_else(|| format!("no export {name}"))?;
        f.call(&mut self.store, &[], &mut []).map_err(|e| format!("{name} failed: {e:?}"))
    }

    /// Reads and checks the frames an unwind left, for an export of
    /// function `entry`.
    fn check_frames(&mut self, entry: u32, name: &str) -> Result<(), String> {
        let bytes = self.control_bytes();
        let header = control::Header::decode(&bytes).ok_or("short control memory")?;
        let raws = abi::read_frames(&bytes).map_err(|e| format!("{name}: frames unreadable: {e}"))?;
        if raws.is_empty() {
            return Err(format!("{name}: unwound without saving a frame"));
        }
        let written = abi::write_frames(&raws);
        if written[..] != bytes[control::FRAMES_BASE as usize..header.frame_sp as usize] {
            return Err(format!("{name}: frames do not re-encode to the same bytes"));
        }
        let last = raws.len() - 1;
        let mut scrambled = raws.clone();
        for (i, raw) in raws.iter().enumerate() {
            let typed = abi::TypedFrame::new(raw, self.meta).map_err(|e| format!("{name}: frame {i}: {e}"))?;
            if typed.to_raw() != *raw {
                return Err(format!("{name}: frame {i} does not round-trip through TypedFrame"));
            }
            let rp = &self.meta.function(raw.func).ok_or("no function")?.resume_points[raw.resume_point as usize];
            // A slot of a local dead at the point holds zero, and no rewind
            // may depend on it: it gets a value the program never had.
            for (j, local) in rp.slots.iter().enumerate() {
                if !rp.locals.contains(local) {
                    if raw.slots[j] != 0 {
                        return Err(format!("{name}: frame {i} holds {:#x} for local {local}, dead at its point", raw.slots[j]));
                    }
                    scrambled[i].slots[j] = 0x5a5a_5a5a_5a5a_5a5a;
                    self.stats.dead_slots += 1;
                }
            }
            let ok = if i == 0 {
                matches!(rp.kind, ResumeKind::Loop | ResumeKind::Entry | ResumeKind::BlockingCall | ResumeKind::CallIndirect)
            } else {
                matches!(rp.kind, ResumeKind::Call | ResumeKind::CallIndirect)
            };
            if !ok {
                return Err(format!("{name}: frame {i} of {} stops at a {:?} resume point", raws.len(), rp.kind));
            }
            if i > 0 {
                // The callee of a direct call is the next frame's function.
                if rp.kind == ResumeKind::Call && rp.callee != raws[i - 1].func {
                    return Err(format!("{name}: frame {i} calls {} but frame {} is of {}", rp.callee, i - 1, raws[i - 1].func));
                }
            }
        }
        if raws[last].func != entry {
            return Err(format!("{name}: outermost frame is of function {}, export is {entry}", raws[last].func));
        }
        self.write_control(control::FRAMES_BASE as usize, &abi::write_frames(&scrambled));
        self.stats.max_depth = self.stats.max_depth.max(raws.len());
        Ok(())
    }

    /// Calls `f` until it returns without unwinding, rewinding after each
    /// unwind.
    fn call(&mut self, mut f: Func, entry: u32, is_import: bool, name: &str, args: &[Val]) -> Result<Ret, String> {
        let ty = f.ty(&self.store);
        let mut results = vec![Val::I32(0); ty.results().len()];
        // A host calling an import directly is not guest code the import
        // could unwind.
        self.store.data_mut().inject_now = !is_import;
        let mut cycles = 0u64;
        loop {
            let r = f.call(&mut self.store, args, &mut results);
            let state = self.state();
            if let Err(e) = r {
                if state != 0 {
                    return Err(format!("{name}: trapped ({e:?}) in state {state}"));
                }
                let h = self.header();
                // Original code only runs in the normal state, after the
                // rewind popped every frame.
                if h.rewinding || h.frame_sp != control::FRAMES_BASE {
                    return Err(format!("{name}: trapped with header {h:?}"));
                }
                return Ok(trap_of(&e));
            }
            match state {
                0 => {
                    let h = self.header();
                    if h.rewinding || h.frame_sp != control::FRAMES_BASE {
                        return Err(format!("{name}: returned normally with header {h:?}"));
                    }
                    let funcs = FuncNames::of(&mut self.store, &self.instance, &self.exports);
                    return Ok(Ret::Values(results.iter().map(|v| V::of(v, &mut self.store, &funcs)).collect()));
                }
                1 => {
                    cycles += 1;
                    self.stats.unwinds += 1;
                    if cycles > MAX_CYCLES {
                        return Err(format!("{name}: no progress after {MAX_CYCLES} unwinds"));
                    }
                    self.stop_unwind()?;
                    // A requested pause is served: clear it before resuming.
                    self.write_control(control::PAUSE_BYTE as usize, &[0]);
                    if is_import {
                        return Err(format!("{name}: an import called by the host unwound"));
                    }
                    self.check_frames(entry, name)?;
                    if let Some((engine, full)) = self.next.take() {
                        self.move_to(engine, full)?;
                        f = self.instance.get_func(&mut self.store, name).ok_or_else(|| format!("the full variant lacks {name}"))?;
                    }
                    self.start_rewind()?;
                }
                s => return Err(format!("{name}: returned in state {s}")),
            }
        }
    }
}

/// Runs the instrumented module; `Err` for a broken protocol (unreadable
/// frames, a state left behind, no progress).
pub fn run_instrumented(
    engine: &Engine,
    original: &[u8],
    inst: &Instrumented,
    mode: Mode,
    next: Option<&Instrumented>,
) -> Result<(Outcome, Stats), String> {
    let module = Module::new(engine, &inst.wasm).map_err(|e| format!("instrumented module does not compile: {e:?}"))?;
    let meta = &inst.metadata;
    if Metadata::from_module(&inst.wasm).map_err(|e| e.to_string())? != *meta {
        return Err("metadata section differs from the returned metadata".into());
    }
    let ex = exports_of(original);
    let (inject, pause) = match mode {
        Mode::Stress { inject, .. } => (inject, None),
        Mode::Pause { every } => (Some(every), Some(every)),
        Mode::Plain | Mode::Switch { .. } => (None, None),
    };
    let mut store = new_store(engine, inject, pause);
    // The instrumented module imports its program memory shared (see
    // `abi::MEMORY_IMPORT`).
    let program = program_memory(engine, meta)?;
    let memory = Mem::Shared(program.clone());
    let control = control_memory(engine)?;
    let mut l = linker(engine);
    l.define(&mut store, abi::IMPORT_MODULE, abi::MEMORY_IMPORT, program.clone()).map_err(|e| e.to_string())?;
    l.define(&mut store, abi::IMPORT_MODULE, abi::CONTROL_IMPORT, control.clone()).map_err(|e| e.to_string())?;
    let mut outcome = Outcome {
        init: Ret::Values(vec![]),
        calls: vec![],
        memory: vec![],
        globals: vec![],
        tables: vec![],
        log: vec![],
    };
    let instance = match l.instantiate(&mut store, &module) {
        Ok(i) => i,
        Err(e) => {
            outcome.init = trap_of(&e);
            return Ok((outcome, Stats::default()));
        }
    };
    let next = next.map(|full| (engine, full));
    let mut d = Driver { store, instance, program, control, meta, exports: &ex, stats: Stats::default(), next };
    d.store.data_mut().control = Some(d.control.clone());
    let header = match mode {
        Mode::Plain | Mode::Pause { .. } => control::Header::default(),
        Mode::Stress { period, .. } | Mode::Switch { period } => control::Header::stress(period),
    };
    d.write_control(0, &header.encode());

    let init = d.instance.get_func(&mut d.store, exports::INIT_MEMORY).ok_or("no init export")?;
    if let Err(e) = init.call(&mut d.store, &[], &mut []) {
        outcome.init = trap_of(&e);
        outcome.log = std::mem::take(&mut d.store.data_mut().log);
        return Ok((outcome, d.stats));
    }
    if let Some(start) = d.instance.get_func(&mut d.store, exports::START) {
        let entry = meta.start.ok_or("upstare_start exported without a start in the metadata")?;
        if let Ret::Trap(t) = d.call(start, entry, entry < ex.imported_funcs, exports::START, &[])? {
            outcome.init = Ret::Trap(t);
            outcome.log = std::mem::take(&mut d.store.data_mut().log);
            return Ok((outcome, d.stats));
        }
    } else if meta.start.is_some() {
        return Err("start function not exported".into());
    }
    for (name, index) in &ex.funcs {
        let f = d.instance.get_func(&mut d.store, name).ok_or("exported func missing")?;
        let a = args(&f.ty(&d.store));
        let ret = d.call(f, *index, *index < ex.imported_funcs, name, &a)?;
        let (mem, globals, _) = observe(&mut d.store, &d.instance, &ex, Some(memory.clone()));
        outcome.calls.push((name.clone(), ret, hash(&mem), globals.into_iter().map(|g| g.1).collect()));
    }
    let (mem, globals, tables) = observe(&mut d.store, &d.instance, &ex, Some(memory.clone()));
    // The original exposes its memory only through an export.
    outcome.memory = if ex.memories.is_empty() { vec![] } else { mem };
    outcome.globals = globals;
    outcome.tables = tables;
    outcome.log = std::mem::take(&mut d.store.data_mut().log);
    Ok((outcome, d.stats))
}

/// Describes the first difference between two outcomes.
pub fn diff(want: &Outcome, got: &Outcome) -> Option<String> {
    if want.init != got.init {
        return Some(format!("initialisation: original {:?}, instrumented {:?}", want.init, got.init));
    }
    for (i, (w, g)) in want.calls.iter().zip(&got.calls).enumerate() {
        if w != g {
            return Some(format!("call {i} ({}): original {:?}, instrumented {:?}", w.0, w, g));
        }
    }
    if want.calls.len() != got.calls.len() {
        return Some(format!("{} calls vs {}", want.calls.len(), got.calls.len()));
    }
    if want.memory != got.memory {
        let at = want.memory.iter().zip(&got.memory).position(|(a, b)| a != b);
        return Some(format!(
            "memory differs (sizes {} and {}, first difference at {at:?})",
            want.memory.len(),
            got.memory.len()
        ));
    }
    if want.globals != got.globals {
        return Some(format!("globals: original {:?}, instrumented {:?}", want.globals, got.globals));
    }
    if want.tables != got.tables {
        return Some("tables differ".into());
    }
    if want.log != got.log {
        return Some(format!("import calls: original {:?}, instrumented {:?}", want.log, got.log));
    }
    None
}

/// The modes every module runs in.
pub const MODES: &[Mode] = &[
    Mode::Plain,
    Mode::Stress { period: 1, inject: Some(2) },
    Mode::Stress { period: 3, inject: None },
    Mode::Stress { period: 17, inject: Some(3) },
    Mode::Pause { every: 3 },
    Mode::Pause { every: 2 },
];

/// Instruments `wasm` and compares it with the original in every mode.
pub fn check(engine: &Engine, wasm: &[u8]) -> Result<Stats, String> {
    let (engine, wasm) = (engine.clone(), wasm.to_vec());
    std::thread::Builder::new()
        .stack_size(4 * WASM_STACK)
        .spawn(move || check_here(&engine, &wasm))
        .expect("thread")
        .join()
        .map_err(|_| "the check panicked".to_string())?
}

/// The options a mode needs: stress mode counts loop headers only in the
/// stress variant.
pub fn options_for(mode: Mode) -> Options {
    let mut o = options();
    o.stress = matches!(mode, Mode::Stress { .. } | Mode::Switch { .. });
    o.unwind_only = matches!(mode, Mode::Switch { .. });
    o
}

/// The periods of [`Mode::Switch`] runs: each moves at a different first
/// unwind.
pub const SWITCH_PERIODS: &[u32] = &[1, 2, 5, 13];

/// Whether a run can move between instances as a host does: a module that
/// changes its tables at run time keeps state in its instance that the
/// move does not carry (nor does a host's, for the C programs it runs,
/// which do not). Data segments the program dropped stay dropped only in
/// the instance it leaves; no module here used one after that.
fn movable(wasm: &[u8]) -> bool {
    use wasmparser::{Operator as O, Payload};
    wasmparser::Parser::new(0).parse_all(wasm).all(|p| match p {
        Ok(Payload::CodeSectionEntry(body)) => body.get_operators_reader().is_ok_and(|ops| {
            ops.into_iter().all(|op| {
                !matches!(
                    op,
                    Ok(O::TableSet { .. }
                        | O::TableGrow { .. }
                        | O::TableFill { .. }
                        | O::TableCopy { .. }
                        | O::TableInit { .. }
                        | O::ElemDrop { .. })
                        | Err(_)
                )
            })
        }),
        p => p.is_ok(),
    })
}

fn check_here(engine: &Engine, wasm: &[u8]) -> Result<Stats, String> {
    let plain = upstare_instrument::instrument(wasm, &options()).map_err(|e| format!("instrument: {e}"))?;
    let stressed = upstare_instrument::instrument(wasm, &options_for(MODES[1])).map_err(|e| format!("instrument for stress: {e}"))?;
    check_metadata(wasm, &plain.metadata)?;
    if stressed.metadata != plain.metadata {
        return Err("the stress variant's metadata differs from the plain one's".into());
    }
    let want = run_original(engine, wasm);
    let mut total = Stats::default();
    for &mode in MODES {
        let inst = if options_for(mode).stress { &stressed } else { &plain };
        let (got, stats) = run_instrumented(engine, wasm, inst, mode, None).map_err(|e| format!("{mode:?}: {e}"))?;
        if let Some(d) = diff(&want, &got) {
            return Err(format!("{mode:?}: {d}"));
        }
        total.unwinds += stats.unwinds;
        total.max_depth = total.max_depth.max(stats.max_depth);
        total.dead_slots += stats.dead_slots;
    }
    if movable(wasm) {
        let unwind_only = upstare_instrument::instrument(wasm, &options_for(Mode::Switch { period: 1 })).map_err(|e| format!("instrument unwind-only: {e}"))?;
        if unwind_only.metadata != plain.metadata {
            return Err("the unwind-only variant's metadata differs from the full one's".into());
        }
        for &period in SWITCH_PERIODS {
            let mode = Mode::Switch { period };
            let (got, stats) = run_instrumented(engine, wasm, &unwind_only, mode, Some(&stressed)).map_err(|e| format!("{mode:?}: {e}"))?;
            if let Some(d) = diff(&want, &got) {
                return Err(format!("{mode:?}: {d}"));
            }
            total.unwinds += stats.unwinds;
            total.switched += u64::from(stats.unwinds > 0);
            total.dead_slots += stats.dead_slots;
        }
    }
    Ok(total)
}

/// Resume points name the original instruction: its offset holds the
/// opcode of its kind, and ordinals count the instructions of the same kind
/// and callee in code order.
pub fn check_metadata(wasm: &[u8], meta: &Metadata) -> Result<(), String> {
    let mut last = None;
    for f in &meta.functions {
        if last.is_some_and(|l| l >= f.index) {
            return Err(format!("functions not in increasing order at {}", f.index));
        }
        last = Some(f.index);
        let mut seen: std::collections::HashMap<(u8, u32), u32> = Default::default();
        let mut prev_offset = 0;
        for (i, rp) in f.resume_points.iter().enumerate() {
            let op = wasm.get(rp.offset as usize).copied();
            let want = match rp.kind {
                ResumeKind::Loop => Some(0x03),
                ResumeKind::Call | ResumeKind::BlockingCall => Some(0x10),
                ResumeKind::CallIndirect => Some(0x11),
                // The body's start: local declarations, any byte.
                ResumeKind::Entry => None,
                // The prefix of `memory.atomic.wait32` and `wait64`.
                ResumeKind::AtomicWait => Some(0xfe),
            };
            if want.is_some() && op != want {
                return Err(format!("function {} rp {i}: {:?} at {:#x} is opcode {op:?}", f.index, rp.kind, rp.offset));
            }
            if rp.offset <= prev_offset {
                return Err(format!("function {} rp {i}: resume points out of code order", f.index));
            }
            prev_offset = rp.offset;
            let class = match rp.kind {
                ResumeKind::Loop => (0, 0),
                ResumeKind::Entry => (3, 0),
                ResumeKind::Call | ResumeKind::BlockingCall => (1, rp.callee),
                ResumeKind::CallIndirect => (2, rp.callee),
                ResumeKind::AtomicWait => (4, rp.callee),
            };
            let next = seen.entry(class).or_default();
            // Unreachable instructions count too, so ordinals may skip.
            if rp.ordinal < *next {
                return Err(format!("function {} rp {i}: ordinal {} repeats or goes back", f.index, rp.ordinal));
            }
            *next = rp.ordinal + 1;
        }
    }
    Ok(())
}

/// Where the plain variant (`options()`) stops when a pause is requested
/// all the time: the function of the innermost frame, and whether it was at
/// the function's entry, for each of the first `stops` unwinds of one call
/// of `export(arg)`.
#[allow(dead_code)]
pub fn plain_stops(engine: &Engine, wasm: &[u8], export: &str, arg: i32, stops: usize) -> Result<Vec<(u32, bool)>, String> {
    let plain = upstare_instrument::instrument(wasm, &options()).map_err(|e| e.to_string())?;
    let ex = exports_of(wasm);
    let mut d = Driver::over_fresh_memories(engine, &plain, &ex)?;
    d.helper(exports::INIT_MEMORY)?;
    let mut seen = Vec::new();
    while seen.len() < stops {
        d.write_control(control::PAUSE_BYTE as usize, &[1]);
        d.call_i32(export, arg)?;
        if d.state() != 1 {
            break;
        }
        d.stop_unwind()?;
        seen.push(d.innermost()?);
        d.start_rewind()?;
    }
    Ok(seen)
}

/// Calls `export(arg)` in the stress variant (period 1: every update point
/// unwinds, the entry of every recursive function among them) until an
/// unwind leaves its innermost frame at the entry of `func`, then rewinds
/// that stack into a fresh instance of the plain variant over the same
/// memories and lets the call finish there. The plain variant checks the
/// entries of only some recursive functions; a frame at the entry of one it
/// does not check must still rewind (an update from a version that checked
/// it leaves one). Returns the call's results and the log of `env` calls, to
/// compare with the original's.
#[allow(dead_code)]
pub fn rewind_entry_across(
    engine: &Engine,
    wasm: &[u8],
    export: &str,
    arg: i32,
    func: u32,
) -> Result<(Vec<i32>, Vec<String>), String> {
    let plain = upstare_instrument::instrument(wasm, &options()).map_err(|e| e.to_string())?;
    let stressed = upstare_instrument::instrument(wasm, &options_for(MODES[1])).map_err(|e| e.to_string())?;
    let ex = exports_of(wasm);
    let mut d = Driver::over_fresh_memories(engine, &stressed, &ex)?;
    d.write_control(0, &control::Header::stress(1).encode());
    d.helper(exports::INIT_MEMORY)?;
    loop {
        d.call_i32(export, arg)?;
        if d.state() != 1 {
            return Err(format!("returned without stopping at the entry of function {func}"));
        }
        d.stop_unwind()?;
        if d.innermost()? == (func, true) {
            break;
        }
        d.start_rewind()?;
    }
    let header = control::Header { stress: false, stress_countdown: 0, stress_period: 0, ..d.header() };
    d.write_control(0, &header.encode());
    d.instance = instantiate_over(engine, &mut d.store, &plain, &d.program, &d.control)?;
    d.meta = &plain.metadata;
    d.helper(exports::DROP_DATA)?;
    d.start_rewind()?;
    let results = d.call_i32(export, arg)?;
    let h = d.header();
    if d.state() != 0 || h.rewinding || h.frame_sp != control::FRAMES_BASE {
        return Err(format!("the plain variant ended in state {} with header {h:?}", d.state()));
    }
    Ok((results, std::mem::take(&mut d.store.data_mut().log)))
}

/// Calls `export(arg)` in the original module: its results and the log of
/// `env` calls.
#[allow(dead_code)]
pub fn call_original(engine: &Engine, wasm: &[u8], export: &str, arg: i32) -> Result<(Vec<i32>, Vec<String>), String> {
    let mut store = new_store(engine, None, None);
    let module = Module::new(engine, wasm).map_err(|e| format!("{e:?}"))?;
    let instance = linker(engine).instantiate(&mut store, &module).map_err(|e| format!("{e:?}"))?;
    let results = call_i32(&mut store, &instance, export, arg)?;
    Ok((results, std::mem::take(&mut store.data_mut().log)))
}

/// Calls `export(arg)`, a function of i32 results.
fn call_i32(store: &mut Store<Host>, instance: &Instance, export: &str, arg: i32) -> Result<Vec<i32>, String> {
    let f = instance.get_func(&mut *store, export).ok_or_else(|| format!("no export {export}"))?;
    let mut results = vec![Val::I32(0); f.ty(&*store).results().len()];
    f.call(&mut *store, &[Val::I32(arg)], &mut results).map_err(|e| format!("{export} failed: {e:?}"))?;
    Ok(results.iter().map(|v| v.i32().unwrap_or(i32::MIN)).collect())
}

/// An instance of the instrumented module over the given program and
/// control memories.
fn instantiate_over(
    engine: &Engine,
    store: &mut Store<Host>,
    inst: &Instrumented,
    program: &SharedMemory,
    control: &SharedMemory,
) -> Result<Instance, String> {
    let mut l = linker(engine);
    l.define(&mut *store, abi::IMPORT_MODULE, abi::MEMORY_IMPORT, program.clone()).map_err(|e| e.to_string())?;
    l.define(&mut *store, abi::IMPORT_MODULE, abi::CONTROL_IMPORT, control.clone()).map_err(|e| e.to_string())?;
    let module = Module::new(engine, &inst.wasm).map_err(|e| format!("instrumented module does not compile: {e:?}"))?;
    l.instantiate(&mut *store, &module).map_err(|e| format!("{e:?}"))
}
