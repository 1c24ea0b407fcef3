//! The rewrite: from the analysis and per-function plans to the output module.
//!
//! [`body`] instruments one function body, [`frames`] emits the code that
//! saves and restores a frame's slots, [`helpers`] builds the functions the
//! instrumenter appends, [`module`] assembles the sections and [`order`]
//! puts the appended functions first. This file holds what they share: the
//! byte sink, the block-type interner and the indices of everything
//! appended.

pub(crate) mod atomics;
pub(crate) mod body;
pub(crate) mod frames;
pub(crate) mod helpers;
pub(crate) mod module;
pub(crate) mod order;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use wasm_encoder::{BlockType, Encode, HeapType, Instruction, MemArg, RefType, ValType};

use crate::abi::{control, ValType as Ty};

/// Encoded instructions.
#[derive(Default)]
pub(crate) struct Code(pub Vec<u8>);

impl Code {
    pub fn op(&mut self, i: Instruction<'_>) {
        i.encode(&mut self.0);
    }
    pub fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    pub fn i32(&mut self, v: i32) {
        self.op(Instruction::I32Const(v));
    }
    /// Pushes a zero (or null) of type `t`.
    pub fn zero(&mut self, t: Ty) {
        self.op(match t {
            Ty::I32 => Instruction::I32Const(0),
            Ty::I64 => Instruction::I64Const(0),
            Ty::F32 => Instruction::F32Const(0.0f32.into()),
            Ty::F64 => Instruction::F64Const(0.0f64.into()),
            Ty::FuncRef => Instruction::RefNull(HeapType::FUNC),
            Ty::ExternRef => Instruction::RefNull(HeapType::EXTERN),
        });
    }
}

/// A memory argument addressing the control memory.
pub(crate) fn ctrl(offset: u32, align: u32) -> MemArg {
    MemArg { offset: offset as u64, align, memory_index: control::MEMORY_INDEX }
}

/// The encoder's value type for a frame type.
pub(crate) fn val(t: Ty) -> ValType {
    match t {
        Ty::I32 => ValType::I32,
        Ty::I64 => ValType::I64,
        Ty::F32 => ValType::F32,
        Ty::F64 => ValType::F64,
        Ty::FuncRef => ValType::Ref(RefType::FUNCREF),
        Ty::ExternRef => ValType::Ref(RefType::EXTERNREF),
    }
}

/// Function types: the original ones (reused when they fit) and the ones
/// the rewrite appends for multi-value blocks and helpers.
pub(crate) struct Types {
    map: HashMap<(Vec<Ty>, Vec<Ty>), u32>,
    next: u32,
    /// Types to append, in index order.
    pub added: Vec<(Vec<Ty>, Vec<Ty>)>,
}

impl Types {
    pub fn new(original: &[wasmparser::FuncType]) -> Types {
        let mut map = HashMap::new();
        for (i, f) in original.iter().enumerate() {
            let p = crate::analysis::tys(f.params(), 0);
            let r = crate::analysis::tys(f.results(), 0);
            if let (Ok(p), Ok(r)) = (p, r) {
                map.entry((p, r)).or_insert(i as u32);
            }
        }
        Types { map, next: original.len() as u32, added: Vec::new() }
    }

    /// Index of the function type `params -> results`.
    pub fn func(&mut self, params: &[Ty], results: &[Ty]) -> u32 {
        let key = (params.to_vec(), results.to_vec());
        if let Some(&i) = self.map.get(&key) {
            return i;
        }
        let i = self.next;
        self.next += 1;
        self.added.push(key.clone());
        self.map.insert(key, i);
        i
    }

    /// The most compact block type for `params -> results`.
    pub fn block(&mut self, params: &[Ty], results: &[Ty]) -> BlockType {
        match (params, results) {
            ([], []) => BlockType::Empty,
            ([], [r]) => BlockType::Result(val(*r)),
            _ => BlockType::FunctionType(self.func(params, results)),
        }
    }
}

/// Indices of the functions the instrumenter appends, in the order they are
/// appended after the original functions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Helpers {
    pub frame_push: u32,
    pub should_pause: u32,
    pub init_memory: u32,
    pub drop_data: u32,
    /// The helpers only code that rewinds calls: absent from the
    /// unwind-only variant.
    pub rewind: Option<RewindHelpers>,
    /// Present when some frame can hold a funcref.
    pub funcrefs: Option<RefSide>,
    /// Present when some frame can hold an externref.
    pub externrefs: Option<RefSide>,
    /// `malloc` over a batch of sizes, present when the program has one
    /// (in the full variant: an update converts the heap in the new
    /// version's instance, which rewinds).
    pub malloc_batch: Option<Batch>,
    /// `free` over a batch of addresses, present with `malloc_batch`.
    pub free_batch: Option<Batch>,
    /// The first function index after these helpers.
    pub next: u32,
}

/// The helpers of the full variant's code that rewinds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RewindHelpers {
    pub frame_pop: u32,
    /// Before a blocking import: ends a rewind that reached it, or decides
    /// to pause.
    pub pre_call: u32,
    pub rewind_done: u32,
}

/// The most params, and the most results, a helper's function type may
/// have: engines refuse more (the limit the JS API sets and wasmparser's
/// validator enforces). Frames with more slots are moved inline.
pub(crate) const MAX_FUNCTION_VALUES: usize = 1000;

/// The most slots a save class with float slots may have and still get a
/// save helper when no other class has its slot types ([`Packs`]).
pub(crate) const MAX_UNSHARED_FLOAT_SAVE_SLOTS: usize = 40;

/// The pack helpers, appended after the [`Helpers`], which move a frame's
/// slots in one call instead of a load or a store per value at every
/// resume point or save class.
///
/// - For each count of numeric locals a resume point saves
///   ([`frames::PackKey`]), up to [`MAX_FUNCTION_VALUES`], `load() ->
///   values` reads them from the first slots of the frame at the frame
///   stack pointer (the one the rewind prologue popped). A rewind case
///   restores all of a point's numbers with it; nothing the hot path keeps
///   lives across the call (the case restores every local live at its
///   point). Larger frames are loaded inline.
/// - For the slot types that two or more save classes of the module have,
///   `save(rp, func, values...)` pushes the frame and stores them all. A
///   class whose slot types no other class has stores its slots inline
///   instead (`body`): a helper for it would be no smaller, and wasmtime
///   compiles a trampoline for every function type of a module, whose
///   compile time grows with its params, so the helper, its unit and its
///   trampoline cost more compile than the stores. Classes with float
///   slots, up to [`MAX_UNSHARED_FLOAT_SAVE_SLOTS`], keep a helper of
///   their own all the same: with compute's `main` class of 24 slots (6 of
///   them floats) stored inline, a loop of `main` keeps its pointer in a
///   stack slot and the guest runs 8% more instructions; with a helper for
///   the float classes, no guest runs more than 0.4% more than with a
///   helper for every class (`docs/PERFORMANCE.md`). Measured, not
///   derived: the register allocator's choice for a cold block outside
///   the loop is not understood. (Splitting the values into chunks by
///   type, so that helpers are shared more, made the code 10% smaller and
///   nbody run 9% more instructions: the values of later chunks live
///   across the earlier calls; passing every value as the 64 bits of its
///   slot, so that classes share a helper by count, cost about as much
///   compile in the conversions as it saved.)
pub(crate) struct Packs {
    /// Load function index by key.
    pub map: BTreeMap<frames::PackKey, u32>,
    /// Save function index by slot types.
    pub saves: BTreeMap<Vec<Ty>, u32>,
}

impl Packs {
    /// Numbers the load helpers of `keys` from `first`, then the save
    /// helpers of the slot types `saves`.
    pub fn new(first: u32, keys: BTreeSet<frames::PackKey>, saves: BTreeSet<Vec<Ty>>) -> Packs {
        let map: BTreeMap<_, _> = keys.into_iter().enumerate().map(|(i, k)| (k, first + i as u32)).collect();
        let next = first + map.len() as u32;
        let saves = saves.into_iter().enumerate().map(|(i, k)| (k, next + i as u32)).collect();
        Packs { map, saves }
    }

    /// The load helper of `key`, unless it would have too many results.
    pub fn load(&self, key: frames::PackKey) -> Option<u32> {
        self.map.get(&key).copied()
    }

    /// The save helper of a frame whose slots have types `slots`, if
    /// classes share one for them.
    pub fn save(&self, slots: &[Ty]) -> Option<u32> {
        self.saves.get(slots).copied()
    }
}

/// The helpers and side table for one reference type. Each type gets its
/// own only when some frame needs it: an engine without GC support cannot
/// even compile a module that declares an externref table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RefSide {
    pub spill: u32,
    pub load: u32,
    pub table: u32,
}

/// A helper that calls one of the program's allocator functions once per
/// entry of an array in the control memory ([`crate::abi::exports::MALLOC_BATCH`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    pub helper: u32,
    /// The allocator function it calls.
    pub target: u32,
}

impl Helpers {
    /// Lays the helpers out after `first` (the number of functions in the
    /// original module), and the side tables after `tables`. `malloc` and
    /// `free` are the program's allocator functions, if it has them. The
    /// unwind-only variant gets only what code that cannot rewind calls.
    pub fn new(first: u32, tables: u32, funcrefs: bool, externrefs: bool, malloc: Option<u32>, free: Option<u32>, unwind_only: bool) -> Helpers {
        let mut next_func = first + 4;
        let rewind = (!unwind_only).then(|| {
            next_func += 3;
            RewindHelpers { frame_pop: next_func - 3, pre_call: next_func - 2, rewind_done: next_func - 1 }
        });
        let mut next_table = tables;
        let mut side = |present: bool| {
            present.then(|| {
                let s = RefSide { spill: next_func, load: next_func + 1, table: next_table };
                next_func += 2;
                next_table += 1;
                s
            })
        };
        let funcrefs = side(funcrefs);
        let externrefs = side(externrefs);
        let mut batch = |target: Option<u32>| {
            target.filter(|_| !unwind_only).map(|target| {
                next_func += 1;
                Batch { helper: next_func - 1, target }
            })
        };
        let (malloc_batch, free_batch) = (batch(malloc), batch(free));
        Helpers {
            frame_push: first,
            should_pause: first + 1,
            init_memory: first + 2,
            drop_data: first + 3,
            rewind,
            funcrefs,
            externrefs,
            malloc_batch,
            free_batch,
            next: next_func,
        }
    }

    /// The helpers of the code that rewinds, which only the full variant
    /// has.
    pub fn rewind(&self) -> crate::error::Result<RewindHelpers> {
        self.rewind.ok_or_else(|| crate::error::internal("code that rewinds in the unwind-only variant"))
    }

    /// The side of reference type `t` (`None` for other types, or when no
    /// frame holds that type).
    pub fn side(&self, t: Ty) -> Option<RefSide> {
        match t {
            Ty::FuncRef => self.funcrefs,
            Ty::ExternRef => self.externrefs,
            _ => None,
        }
    }

    /// The reference sides present, with their types.
    pub fn sides(&self) -> impl Iterator<Item = (Ty, RefSide)> {
        [(Ty::FuncRef, self.funcrefs), (Ty::ExternRef, self.externrefs)]
            .into_iter()
            .filter_map(|(t, s)| Some((t, s?)))
    }
}

/// Module-wide facts every body rewrite needs.
pub(crate) struct Cx {
    pub types: Types,
    pub helpers: Helpers,
    pub state_global: u32,
    /// The global the rewind prologue puts its frame's resume point in.
    pub rp_global: u32,
    /// The stress variant: loop headers call the pause decision.
    pub stress: bool,
    /// The unwind-only variant ([`crate::Options::unwind_only`]).
    pub unwind_only: bool,
    pub packs: Packs,
    /// The function indices of a module whose futex instructions were
    /// lowered ([`atomics`]) are shifted; frames name the original's.
    pub shift: atomics::Shift,
}
