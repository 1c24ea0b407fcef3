//! Typed tracing of a paused program's heap: from the globals and the
//! paused frames' variables ([`super::frames`]), follow every
//! pointer by its DWARF type into the allocations it reaches, give each
//! allocation the type it is reached as, and decide which ones must be
//! converted because their type changed layout.
//!
//! Each traced value is a pair of types, old and new. Where a pointer's
//! pointee type is the same in both versions the pair's new side is `None`:
//! the objects behind it are traced only to learn their type (so that a
//! later scan need not guess what their words are) and stay as they are.
//! Where it differs, every object reached is converted when its layout
//! changed, and every pointer to it is rewritten.
//!
//! An allocation's type comes from the pointers to its start; a pointer to
//! a base type (`char *`) is an alias that does not claim a type, so a
//! buffer cleared through `memset` or walked as bytes is no conflict. Two
//! pointers claiming different struct types for one allocation refuse the
//! update when either type changed. An allocation of `n` elements has its
//! length from the chunk (`malloc(n * sizeof *p)`).

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use super::dlmalloc::Chunks;
use super::{FrameRoots, MemoryView, Moved, Plan, Pointee, Region, Roots};
use crate::dwarf::{DebugInfo, Type, TypeId, ValueMap, same_type, value_map_through_pointers};

/// How many values ahead of the one visited the tracer prefetches: enough
/// for a cache miss to complete while the values between are visited.
const LOOKAHEAD: usize = 8;

/// A generation of at least this many values is resolved on two threads:
/// enough work to repay starting one (tens of microseconds), which a list's
/// generations of one node each never are.
const PARALLEL_FROM: usize = 4096;

/// A value to visit: where it lies, how to walk it, and how it was reached.
type Item = (u32, ShapeId, Via);

/// What the read-only half of a visit found for one pointer member: the
/// word it holds (`None`: out of memory) and the allocation holding the
/// address in it (none for a null pointer).
#[derive(Debug, Clone, Copy)]
struct Resolved {
    value: Option<u32>,
    target: Option<Target>,
}

/// The allocation a pointer points into. Found where the trace reads its
/// pointers, on two threads, so that the thread following them in order
/// reads no more of the chunk index, and for most pointers to objects met
/// before (a tree's parent pointers) nothing of the claims either.
#[derive(Debug, Clone, Copy)]
struct Target {
    chunk: u32,
    /// Whether the pointer holds the allocation's start.
    at_start: bool,
    /// The allocation's usable bytes.
    size: u32,
    /// Whether the allocation was claimed already when the pointer was
    /// read, as the pointer's own pointee with nothing for it to add (see
    /// [`Tracer::claim`]): claiming it again would change nothing, and no
    /// claim made between the read and the follow changes that (a claim
    /// only changes by gaining a shape or a new type, after which this
    /// pointer adds neither).
    settled: bool,
}

/// The allocation holding `address`, if any, for a pointer to `old`
/// becoming `new`.
fn locate(chunks: &Chunks, claims: &[Claim], address: u32, old: TypeId, new: Option<TypeId>) -> Option<Target> {
    let chunk = chunks.containing(address)?;
    let c = chunks.all()[chunk];
    let at_start = address == c.start;
    let settled = at_start && {
        let claim = claims[chunk];
        claim.old == old && (claim.new().is_some() || new.is_none())
    };
    Some(Target { chunk: chunk as u32, at_start, size: c.size, settled })
}

/// What `void *` members point to, by (struct tag, member).
type Pointees = std::collections::HashMap<(String, String), Pointee>;

/// What a word inside a value is, for the tracer.
#[derive(Debug, Clone, Copy)]
enum FieldKind {
    /// A data pointer to `old`, whose pointee becomes `new` when its type
    /// changed (known once the value's own type pair is: see [`Shape`]).
    Pointer { old: TypeId, new: Option<TypeId> },
    /// Bytes that may hold a pointer of unknown type (`void *`, a union).
    Untyped(u32),
}

#[derive(Debug, Clone, Copy)]
struct Field {
    offset: u32,
    kind: FieldKind,
    /// Member path from the value, like `.next` or `.slots[3]`, as an index
    /// in [`Tracer::names`].
    path: Name,
}

/// A member path, by its index in the tracer's table of them: claims and
/// fields are copied by the million, their paths read only for messages.
pub(super) type Name = u32;

/// The empty member path: the value itself.
const WHOLE: Name = 0;

/// How the tracer walks each value of one type pair (old, new): the words
/// that may hold pointers, each pointer with its pointee's new type when
/// that changed. Made once per pair, so a visit neither hashes nor looks up
/// offsets.
struct Shape {
    fields: Vec<Field>,
}

/// Index of a [`Shape`] in [`Tracer::shapes`].
type ShapeId = u32;

/// A value being traced: a root, or one element of an allocation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Via {
    Root(u32),
    Object { chunk: u32, element: u32 },
}

/// The type an allocation was given, `old` becoming `new`. Read for every
/// pointer into the allocation, so kept to 8 bytes, the allocations' array
/// of them dense in the cache; where the type came from is an [`Origin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    /// [`NO_TYPE`]: not claimed yet.
    old: TypeId,
    /// [`NO_TYPE`]: the type stays.
    new: TypeId,
}

const NO_TYPE: TypeId = TypeId(u32::MAX);

impl Claim {
    const NONE: Claim = Claim { old: NO_TYPE, new: NO_TYPE };

    fn is_claimed(self) -> bool {
        self.old != NO_TYPE
    }

    fn new(self) -> Option<TypeId> {
        (self.new != NO_TYPE).then_some(self.new)
    }
}

/// The value holding the first pointer that gave an allocation its type,
/// and the pointer's member path in it, for messages.
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin {
    pub(super) from: Via,
    pub(super) field: Name,
}

/// One trace of a paused heap: the work list, what each allocation was
/// claimed as, and the pointers found on the way.
pub(super) struct Tracer<'a> {
    old: &'a DebugInfo,
    new: &'a DebugInfo,
    memory: &'a dyn MemoryView,
    chunks: &'a Chunks,
    /// The globals, and what the plan learnt of the two versions.
    roots: &'a Roots,
    frames: &'a FrameRoots,
    /// The roots' names, for messages: the globals, then the frames'
    /// variables in memory, then those in locals.
    root_names: Vec<String>,
    moved: &'a [Moved],
    claims: Vec<Claim>,
    origins: Vec<Option<Origin>>,
    /// The member paths [`Name`]s index.
    names: Vec<Arc<str>>,
    shapes: Vec<Shape>,
    shape_ids: HashMap<(TypeId, Option<TypeId>), ShapeId>,
    pairs: HashMap<(TypeId, TypeId), Arc<(ValueMap, HashMap<u64, TypeId>)>>,
    /// The values the generation being visited reached, to visit next
    /// (breadth first: a generation's values can be read in any order,
    /// and are followed in this one).
    work: Vec<Item>,
    slots: Vec<(u32, u32)>,
    /// The allocation each slot points into, with [`super::AT_START`] when
    /// it holds the allocation's start, or [`super::NOT_IN_HEAP`].
    slot_chunks: Vec<u32>,
    /// `void *` and union members met while tracing, named lazily.
    untyped: Vec<(u32, u32, Via, Name)>,
    inside: Vec<Inside>,
    /// For each changed type pair, its index in `object_kinds`, or `None`
    /// when its objects' bytes need not move.
    kinds: HashMap<(TypeId, TypeId), Option<u32>>,
    /// One description per changed type pair, shared by its objects.
    object_kinds: Vec<super::ObjectKind>,
    pointers: u64,
}

/// A pointer to a changed type into the middle of an allocation.
struct Inside {
    chunk: usize,
    value: u32,
    pointee: TypeId,
    from: Via,
    field: Name,
}

impl<'a> Tracer<'a> {
    pub(super) fn new(
        old: &'a DebugInfo,
        new: &'a DebugInfo,
        memory: &'a dyn MemoryView,
        chunks: &'a Chunks,
        roots: &'a Roots,
        frames: &'a FrameRoots,
        moved: &'a [Moved],
    ) -> Self {
        let globals = roots.globals.iter().map(|r| &r.name);
        let in_frames = frames.memory.iter().map(|r| &r.name).chain(frames.values.iter().map(|v| &v.name));
        Tracer {
            old,
            new,
            memory,
            chunks,
            roots,
            frames,
            root_names: globals.chain(in_frames).cloned().collect(),
            moved,
            claims: vec![Claim::NONE; chunks.all().len()],
            origins: vec![None; chunks.all().len()],
            names: vec![Arc::from("")],
            shapes: Vec::new(),
            shape_ids: HashMap::default(),
            pairs: HashMap::default(),
            work: Vec::new(),
            slots: Vec::new(),
            slot_chunks: Vec::new(),
            untyped: Vec::new(),
            inside: Vec::new(),
            kinds: HashMap::default(),
            object_kinds: Vec::new(),
            pointers: 0,
        }
    }

    /// Traces from every root and plans the conversion. `untyped` are the
    /// regions outside the heap whose words may hold pointers; those from
    /// index `stacks_from` on are shadow stacks.
    pub(super) fn run(mut self, untyped: Vec<Region>, stacks_from: usize) -> Result<Plan, String> {
        let frames = self.frames;
        for (i, root) in self.roots.globals.iter().chain(&frames.memory).enumerate() {
            let via = Via::Root(i as u32);
            let shape = self.shape(root.old_ty, root.new_ty, via)?;
            self.work.push((root.address, shape, via));
        }
        let first_value = self.roots.globals.len() + frames.memory.len();
        for (i, v) in frames.values.iter().enumerate() {
            self.pointers += 1;
            self.pointer(None, v.value, v.pointee, v.new_pointee, Via::Root((first_value + i) as u32), WHOLE)?;
        }
        let (mut generation, mut resolved) = (Vec::new(), Vec::new());
        while !self.work.is_empty() {
            std::mem::swap(&mut generation, &mut self.work);
            self.visit_generation(&generation, &mut resolved)?;
            generation.clear();
        }
        if !self.roots.changed_structs.is_empty() {
            for &(address, size, via, field) in &self.untyped {
                self.check_untyped(address, size, via, field)?;
            }
        }
        for i in &self.inside {
            if self.claims[i.chunk].new().is_none() {
                let c = self.chunks.all()[i.chunk];
                return Err(format!(
                    "{} points {} bytes into an allocation of {} bytes whose type the trace cannot tell, where an object of changed type {} cannot be converted (an allocator wrapper that keeps a header before each object hides it)",
                    self.path(i.from, i.field),
                    i.value - c.start,
                    c.size,
                    self.old.type_name(i.pointee)
                ));
            }
        }
        // Counted first: a million objects are tens of megabytes, which
        // growing by doubling would copy and fault in twice over.
        let mut objects = Vec::with_capacity(self.claims.iter().filter(|c| c.new().is_some()).count());
        // Neighbouring objects tend to be of the same few types.
        let mut last = None;
        for chunk in 0..self.claims.len() {
            let Claim { old, new } = self.claims[chunk];
            if new == NO_TYPE {
                continue;
            }
            let kind = match last {
                Some((pair, kind)) if pair == (old, new) => kind,
                _ => {
                    let Some(Origin { from, field }) = self.origins[chunk] else { continue };
                    let kind = self.kind(old, new, from, field)?;
                    last = Some(((old, new), kind));
                    kind
                }
            };
            let Some(kind) = kind else { continue };
            let c = self.chunks.all()[chunk];
            objects.push(super::Object {
                start: c.start,
                count: c.size / self.object_kinds[kind as usize].old_size,
                chunk_size: c.size,
                chunk: chunk as u32,
                kind,
            });
        }
        let unclaimed: Vec<usize> =
            (0..self.claims.len()).filter(|&c| !self.claims[c].is_claimed() && !self.chunks.is_internal(c)).collect();
        let suspects = self.suspects(&unclaimed);
        let paths = super::Paths { roots: self.root_names, origins: self.origins, names: self.names };
        let mut object_of_chunk = vec![u32::MAX; self.chunks.all().len()];
        for (i, o) in objects.iter().enumerate() {
            object_of_chunk[o.chunk as usize] = i as u32;
        }
        let slot_objects = self
            .slot_chunks
            .iter()
            .map(|&c| match c {
                super::NOT_IN_HEAP => super::NOT_IN_HEAP,
                c => match object_of_chunk[(c & !super::AT_START) as usize] {
                    u32::MAX => super::UNCONVERTED,
                    o => o | (c & super::AT_START),
                },
            })
            .collect();
        let mut plan = Plan {
            objects,
            kinds: self.object_kinds,
            slots: self.slots,
            slot_objects,
            moved: self.moved.to_vec(),
            pointers_traced: self.pointers,
            allocator: Vec::new(),
            chunks: (0, 0),
            suspects,
            suspect_tags: self.roots.changed_structs.iter().map(|(tag, _)| tag.clone()).collect(),
            untyped_stack_holder: None,
            paths,
        };
        // Words no type tells are checked for what moves: converted objects
        // and globals. (The host's own scan covers the frames' locals, the
        // globals and the shadow stack for globals that move; this one
        // covers the heap too.)
        if !plan.objects.is_empty() || !plan.moved.is_empty() || !plan.suspects.is_empty() {
            // In the untyped regions, the words the frames' DWARF accounts
            // for: pointers the trace rewrites, bytes of typed variables
            // (not pointers, as inside any typed value), dead variables.
            // Only slots inside those regions matter; the heap's (nearly
            // all of them) lie above every one.
            let (low, high) = untyped.iter().fold((u32::MAX, 0), |(l, h), r| (l.min(r.address), h.max(r.address.saturating_add(r.size))));
            let mut known: rustc_hash::FxHashSet<u32> =
                plan.slots.iter().map(|&(slot, _)| slot).filter(|&slot| slot >= low && slot < high).collect();
            let spans = self.frames.memory.iter().map(|r| (r.address, r.size)).chain(self.frames.dead.iter().copied());
            for (address, size) in spans {
                known.extend((address..address.saturating_add(size)).step_by(4));
            }
            for r in &untyped {
                plan.check_words(self.memory, r.address, r.size, &known, || r.what.clone())?;
            }
            // A word of a stack that no variable accounts for (a libc
            // frame's, a spill) may be all that holds an object of a changed
            // struct; the data without debug info is left out: libc keeps
            // pointers to its own allocations there for good.
            plan.untyped_stack_holder = untyped[stacks_from.min(untyped.len())..].iter().find_map(|r| {
                let (at, s) = super::words(self.memory, r.address, r.size)
                    .filter(|(at, _)| !known.contains(at))
                    .find_map(|(at, value)| Some((at, plan.suspect_at(value)?)))?;
                Some((format!("{} (the word at {at:#x})", r.what), s))
            });
            let none = rustc_hash::FxHashSet::default();
            for &(address, size, via, field) in &self.untyped {
                plan.check_words(self.memory, address, size, &none, || plan.paths.render(via, field))?;
            }
            for chunk in unclaimed {
                let c = self.chunks.all()[chunk];
                let end = c.start.saturating_add(c.size);
                // Another thread's stack: its words below the live part are
                // dead frames, and the live part is one of the untyped
                // regions, checked above with what its frames tell.
                let from = self.frames.thread_stacks_from.iter().copied().filter(|&sp| sp > c.start && sp < end).max().unwrap_or(c.start);
                for (at, to) in outside(from, end, &untyped) {
                    plan.check_words(self.memory, at, to - at, &none, || {
                        format!("an allocation at {:#x} that no typed pointer reaches", c.start)
                    })?;
                }
            }
        }
        plan.check_slots()?;
        Ok(plan)
    }

    /// The `unclaimed` allocations (by index, in address order) whose size
    /// fits an array of some struct whose type changed: see
    /// [`Plan::suspects`].
    fn suspects(&self, unclaimed: &[usize]) -> Vec<super::Suspect> {
        let changed = &self.roots.changed_structs;
        if changed.is_empty() {
            return Vec::new();
        }
        unclaimed
            .iter()
            .filter_map(|&chunk| {
                let c = self.chunks.all()[chunk];
                let tag = changed.iter().position(|&(_, size)| fits(c.size, size))?;
                Some(super::Suspect { start: c.start, size: c.size, tag: tag as u32 })
            })
            .collect()
    }

    /// Refuses when the `size` bytes at `address`, a `void *` or a union
    /// (`field` of `via`), hold the start of an allocation that no typed
    /// pointer reached and whose size fits an array of some struct whose
    /// type changed: what it holds cannot be told, so it could not be
    /// converted.
    fn check_untyped(&self, address: u32, size: u32, via: Via, field: Name) -> Result<(), String> {
        for (_, value) in super::words(self.memory, address, size) {
            let Some(chunk) = self.chunks.containing(value).filter(|&c| !self.chunks.is_internal(c)) else { continue };
            let c = self.chunks.all()[chunk];
            if c.start != value || self.claims[chunk].is_claimed() {
                continue;
            }
            if let Some((tag, _)) = self.roots.changed_structs.iter().find(|(_, s)| fits(c.size, *s)) {
                return Err(format!(
                    "{} points to an allocation of {} bytes whose type no typed pointer tells: it may hold `struct {tag}`, whose type changed, and would not be converted (declare what it points to with UPSTARE_POINTS_TO in the new version)",
                    self.path(via, field),
                    c.size
                ));
            }
        }
        Ok(())
    }

    /// What converting objects of `old` to `new` takes, as an index in
    /// `object_kinds`; `None` when their bytes need not move (only
    /// pointers inside them change type).
    fn kind(&mut self, old: TypeId, new: TypeId, from: Via, field: Name) -> Result<Option<u32>, String> {
        if let Some(&k) = self.kinds.get(&(old, new)) {
            return Ok(k);
        }
        let Some(pair) = self.pair(old, new) else {
            let root = format!("*{}", self.path(from, field));
            return Err(self.unmappable(old, new, &root));
        };
        let (old_size, new_size) = (self.size(self.old, old)?, self.size(self.new, new)?);
        if pair.0.is_whole_copy(old_size, new_size) {
            self.kinds.insert((old, new), None);
            return Ok(None);
        }
        let kind = super::ObjectKind {
            old_size,
            new_size,
            map: pair.0.clone(),
            type_name: self.old.type_name(old),
            converter: match self.old.ty(old) {
                Type::Struct { name: Some(tag), .. } => self.roots.converters.get(tag).cloned(),
                _ => None,
            },
        };
        let index = self.object_kinds.len() as u32;
        self.object_kinds.push(kind);
        self.kinds.insert((old, new), Some(index));
        Ok(Some(index))
    }

    fn size(&self, debug: &DebugInfo, ty: TypeId) -> Result<u32, String> {
        match debug.size_of(ty) {
            Some(s) if s > 0 => u32::try_from(s).map_err(|_| format!("type {} is too large", debug.type_name(ty))),
            _ => Err(format!("objects of type {} have no known size", debug.type_name(ty))),
        }
    }

    /// Visits one generation of values: first what can be read without
    /// changing anything (the pointers' values and the allocations they
    /// point into, the cache misses of the trace), on two threads when the
    /// generation is wide; then, in order, what each pointer claims.
    fn visit_generation(&mut self, items: &[Item], resolved: &mut Vec<Resolved>) -> Result<(), String> {
        let (memory, chunks, claims, shapes) = (self.memory, self.chunks, &self.claims, &self.shapes);
        resolved.clear();
        if items.len() < PARALLEL_FROM {
            resolve(memory, chunks, claims, shapes, items, resolved);
            return self.follow(items, resolved);
        }
        let (first, second) = items.split_at(items.len() / 2);
        let mut rest = Vec::new();
        std::thread::scope(|scope| {
            let helper = std::thread::Builder::new()
                .name("heap-trace".into())
                .spawn_scoped(scope, || {
                    let mut out = Vec::new();
                    resolve(memory, chunks, claims, shapes, second, &mut out);
                    out
                })
                .ok();
            resolve(memory, chunks, claims, shapes, first, resolved);
            match helper.map(|h| h.join()) {
                Some(Ok(out)) => rest = out,
                // Without a second thread the work is all this one's.
                _ => resolve(memory, chunks, claims, shapes, second, &mut rest),
            }
        });
        self.follow(first, resolved)?;
        self.follow(second, &rest)
    }

    /// The second half of visiting `items`: each pointer found, in order,
    /// with what [`resolve`] read for it.
    fn follow(&mut self, items: &[Item], resolved: &[Resolved]) -> Result<(), String> {
        let mut resolved = resolved.iter();
        for &(at, shape, via) in items {
            for i in 0..self.shapes[shape as usize].fields.len() {
                let f = self.shapes[shape as usize].fields[i];
                let slot = at.wrapping_add(f.offset);
                match f.kind {
                    FieldKind::Untyped(size) => self.untyped.push((slot, size, via, f.path)),
                    FieldKind::Pointer { old, new } => {
                        let r = resolved.next().expect("resolve reads every pointer member once");
                        let Some(value) = r.value else {
                            return Err(format!("{} lies outside memory", self.path(via, f.path)));
                        };
                        if value == 0 {
                            continue;
                        }
                        self.pointers += 1;
                        self.pointer_into(Some(slot), value, r.target, old, new, via, f.path)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Follows the pointer `value`, held at `slot` in memory or, with no
    /// slot, in a frame's local (which [`super::frame_pointers`] rewrites).
    fn pointer(
        &mut self,
        slot: Option<u32>,
        value: u32,
        pointee: TypeId,
        new_pointee: Option<TypeId>,
        via: Via,
        field: Name,
    ) -> Result<(), String> {
        self.pointer_into(slot, value, locate(self.chunks, &self.claims, value, pointee, new_pointee), pointee, new_pointee, via, field)
    }

    /// [`Tracer::pointer`], with the allocation that holds `value`
    /// (`target`) looked up already.
    #[allow(clippy::too_many_arguments)]
    fn pointer_into(
        &mut self,
        slot: Option<u32>,
        value: u32,
        target: Option<Target>,
        pointee: TypeId,
        new_pointee: Option<TypeId>,
        via: Via,
        field: Name,
    ) -> Result<(), String> {
        if let Some(Target { chunk, at_start, size, settled }) = target.filter(|t| !self.chunks.is_internal(t.chunk as usize)) {
            let chunk = chunk as usize;
            if let Some(slot) = slot {
                self.slots.push((slot, value));
                self.slot_chunks.push(chunk as u32 | if at_start { super::AT_START } else { 0 });
            }
            if !at_start {
                // Into the allocation, not at its start (an element, a
                // member): an alias, rewritten with whatever the allocation
                // turns out to be. Only the pointer `malloc` returned, or a
                // copy of it, says what the allocation is; a pointer to a
                // changed type must find that it was converted.
                if new_pointee.is_some() {
                    self.inside.push(Inside { chunk, value, pointee, from: via, field });
                }
                return Ok(());
            }
            if settled {
                return Ok(());
            }
            return self.claim(chunk, value, size, pointee, new_pointee, via, field);
        }
        let Some(slot) = slot else {
            // A local pointing outside the heap: the frame checks of the
            // update see to globals that move and to the shadow stack.
            return Ok(());
        };
        if self.moved.iter().any(|m| m.contains(value)) {
            self.slots.push((slot, value));
            self.slot_chunks.push(super::NOT_IN_HEAP);
            return Ok(());
        }
        if new_pointee.is_some() {
            // Not an allocation: a global of the same type, the shadow stack
            // or memory the tracer cannot see. A pointer whose pointee type
            // changed must not go on pointing at an old layout unseen.
            let path = self.path(via, field);
            if !self.roots.globals.iter().any(|r| value >= r.address && value - r.address < r.size.max(1)) {
                return Err(format!(
                    "{path} points to {value:#x}, outside every allocation and global, at an object of changed type {}",
                    self.old.type_name(pointee)
                ));
            }
        }
        Ok(())
    }

    /// Gives `chunk` (of `size` bytes from `start`) the type `old`
    /// (converted to `new`), tracing its elements the first time it is
    /// given a shape.
    #[allow(clippy::too_many_arguments)]
    fn claim(&mut self, chunk: usize, start: u32, size: u32, old: TypeId, new: Option<TypeId>, from: Via, field: Name) -> Result<(), String> {
        let c = self.claims[chunk];
        let expand = if !c.is_claimed() {
            true
        } else {
            let (shaped, was_shaped) = (self.shaped(old), self.shaped(c.old));
            if !was_shaped && shaped {
                true
            } else if !shaped || !was_shaped {
                false
            } else if c.old == old || same_type(self.old, c.old, self.old, old) {
                // Reached again as the same type; a pair found now where
                // the first visit saw none is converted all the same.
                c.new().is_none() && new.is_some()
            } else if c.new().is_some() || new.is_some() {
                let first = self.origins[chunk].expect("a claimed allocation has an origin");
                return Err(format!(
                    "the allocation at {start:#x} is reached as {} ({}) and as {} ({}), and one of the two types changed",
                    self.old.type_name(c.old),
                    self.path(first.from, first.field),
                    self.old.type_name(old),
                    self.path(from, field),
                ));
            } else {
                false
            }
        };
        if !expand {
            return Ok(());
        }
        self.claims[chunk] = Claim { old, new: new.unwrap_or(NO_TYPE) };
        self.origins[chunk] = Some(Origin { from, field });
        let chunk_size = size;
        let size = self.old.size_of(old).unwrap_or(0) as u32;
        if size == 0 {
            return Ok(());
        }
        if size > chunk_size && new.is_some() {
            return Err(format!(
                "{} points to an allocation of {chunk_size} bytes, smaller than its type {} ({size} bytes)",
                self.path(from, field),
                self.old.type_name(old)
            ));
        }
        let chunk = chunk as u32;
        let shape = self.shape(old, new, Via::Object { chunk, element: 0 })?;
        if !self.shapes[shape as usize].fields.is_empty() {
            for i in 0..chunk_size / size {
                self.work.push((start + i * size, shape, Via::Object { chunk, element: i }));
            }
        }
        Ok(())
    }

    /// The shape of values of `old` becoming `new`; an `Err` when no
    /// automatic mapping carries one to the other (`via` is the first such
    /// value, for the message).
    fn shape(&mut self, old: TypeId, new: Option<TypeId>, via: Via) -> Result<ShapeId, String> {
        if let Some(&id) = self.shape_ids.get(&(old, new)) {
            return Ok(id);
        }
        let pair = match new {
            Some(new) => match self.pair(old, new) {
                Some(pair) => Some(pair),
                None => return Err(self.unmappable(old, new, &self.path(via, WHOLE))),
            },
            None => None,
        };
        let mut fields = Vec::new();
        collect_fields(self.old, &self.roots.pointees, old, 0, "", &mut fields, 0);
        let fields = fields
            .into_iter()
            .map(|(offset, kind, path)| {
                let kind = match (kind, &pair) {
                    (FieldKind::Pointer { old, new: None }, Some(pair)) => {
                        FieldKind::Pointer { old, new: pair.1.get(&u64::from(offset)).copied() }
                    }
                    (kind, _) => kind,
                };
                self.names.push(Arc::from(path));
                Field { offset, kind, path: (self.names.len() - 1) as Name }
            })
            .collect();
        let id = self.shapes.len() as ShapeId;
        self.shapes.push(Shape { fields });
        self.shape_ids.insert((old, new), id);
        Ok(id)
    }

    /// The C expression of `field` in `via`, for messages.
    fn path(&self, via: Via, field: Name) -> String {
        path(&self.root_names, &self.origins, &self.names, via, field)
    }

    /// Whether values of `ty` have members (a struct, union, array or
    /// pointer), as opposed to plain bytes.
    fn shaped(&self, ty: TypeId) -> bool {
        !matches!(self.old.ty(ty), Type::Base { .. } | Type::Enum { .. } | Type::Unknown | Type::Function)
    }

    /// How a value of `old` becomes one of `new`, and the pointee pairs of
    /// its pointers that changed, by offset.
    /// `None` when no automatic mapping carries `old` to `new`
    /// ([`Tracer::unmappable`] says why).
    fn pair(&mut self, old: TypeId, new: TypeId) -> Option<Arc<(ValueMap, HashMap<u64, TypeId>)>> {
        if let Some(p) = self.pairs.get(&(old, new)) {
            return Some(p.clone());
        }
        let map = value_map_through_pointers(self.old, old, self.new, new, "").ok()?;
        let pointees = map.pointers.iter().map(|p| (p.from, p.new)).collect();
        let p = Arc::new((map, pointees));
        self.pairs.insert((old, new), p.clone());
        Some(p)
    }

    /// Why the value `root` of `old` cannot become one of `new`: the
    /// mapping again, for its message.
    fn unmappable(&self, old: TypeId, new: TypeId, root: &str) -> String {
        match value_map_through_pointers(self.old, old, self.new, new, root) {
            Err(e) => e.to_string(),
            Ok(_) => format!("{root}: cannot be mapped"),
        }
    }
}

/// The read-only half of visiting `items`, into `out`: for each pointer
/// member of each value, in order, its word and the allocation it points
/// into. Prefetches the value [`LOOKAHEAD`] items ahead.
fn resolve(memory: &dyn MemoryView, chunks: &Chunks, claims: &[Claim], shapes: &[Shape], items: &[Item], out: &mut Vec<Resolved>) {
    for (i, &(at, shape, _)) in items.iter().enumerate() {
        if let Some(&(ahead, ..)) = items.get(i + LOOKAHEAD) {
            memory.prefetch(ahead);
        }
        for f in &shapes[shape as usize].fields {
            if let FieldKind::Pointer { old, new } = f.kind {
                let value = memory.read_u32(at.wrapping_add(f.offset));
                let target = value.filter(|&v| v != 0).and_then(|v| locate(chunks, claims, v, old, new));
                out.push(Resolved { value, target });
            }
        }
    }
}

/// Whether an allocation of `usable` bytes may be an array of elements of
/// `size` bytes: dlmalloc rounds a request up by less than its alignment.
fn fits(usable: u32, size: u32) -> bool {
    usable >= size && usable % size < super::dlmalloc::ALIGN
}

/// Nesting deeper than this is a type this reader does not follow.
const MAX_DEPTH: u32 = 32;

/// A word of a value that may hold a pointer: its offset, what it is, and
/// its member path (`.slots[3].value`).
type RawField = (u32, FieldKind, String);

fn collect_fields(debug: &DebugInfo, pointees: &Pointees, ty: TypeId, at: u32, path: &str, out: &mut Vec<RawField>, depth: u32) {
    let untyped = |out: &mut Vec<RawField>, size: u64| out.push((at, FieldKind::Untyped(size as u32), path.to_string()));
    if depth > MAX_DEPTH {
        return untyped(out, debug.size_of(ty).unwrap_or(0));
    }
    match debug.ty(ty) {
        Type::Base { .. } | Type::Enum { .. } | Type::Function => {}
        Type::Pointer { to: None } => untyped(out, 4),
        Type::Pointer { to: Some(p) } => {
            if !matches!(debug.ty(*p), Type::Function) {
                out.push((at, FieldKind::Pointer { old: *p, new: None }, path.to_string()));
            }
        }
        Type::Struct { name: tag, members, .. } => {
            for m in members.iter().filter(|m| m.bit_field.is_none()) {
                let name = m.name.as_deref().unwrap_or("<anonymous>");
                let member_path = format!("{path}.{name}");
                let declared = match (tag, debug.ty(m.ty)) {
                    (Some(tag), Type::Pointer { to: None }) => pointees.get(&(tag.clone(), name.to_string())),
                    _ => None,
                };
                match declared {
                    // A `void *` the new version says holds this struct.
                    Some(&Pointee::Struct(old, new)) => {
                        out.push((at + m.offset as u32, FieldKind::Pointer { old, new }, member_path))
                    }
                    Some(Pointee::Data) => {}
                    None => collect_fields(debug, pointees, m.ty, at + m.offset as u32, &member_path, out, depth + 1),
                }
            }
        }
        Type::Union { size, .. } => untyped(out, *size),
        Type::Array { element, count } => {
            let (Some(n), Some(size)) = (*count, debug.size_of(*element)) else { return };
            let mut inner = Vec::new();
            collect_fields(debug, pointees, *element, 0, "", &mut inner, depth + 1);
            if inner.is_empty() {
                return;
            }
            for i in 0..n {
                for (offset, kind, inner_path) in &inner {
                    out.push((at + (i * size) as u32 + offset, *kind, format!("{path}[{i}]{inner_path}")));
                }
            }
        }
        Type::Unknown => untyped(out, debug.size_of(ty).unwrap_or(4)),
    }
}

/// The C expression of `field` (a [`Name`] in `names`) in the traced value
/// `via`, from its root, for messages: `conns[3]->next->buf`.
pub(super) fn path(roots: &[String], origins: &[Option<Origin>], names: &[Arc<str>], via: Via, field: Name) -> String {
    path_within(roots, origins, names, via, &names[field as usize], 0)
}

fn path_within(roots: &[String], origins: &[Option<Origin>], names: &[Arc<str>], via: Via, field: &str, depth: u32) -> String {
    // A claim upgraded from bytes to a struct may name a value reached
    // through itself; a long path says nothing more anyway.
    if depth > 32 {
        return format!("...{field}");
    }
    match via {
        Via::Root(r) => format!("{}{field}", roots[r as usize]),
        Via::Object { chunk, element } => {
            let Some(c) = origins.get(chunk as usize).and_then(|c| c.as_ref()) else { return format!("?{field}") };
            let pointer = path_within(roots, origins, names, c.from, &names[c.field as usize], depth + 1);
            match (element, field.strip_prefix('.')) {
                (0, Some(member)) => format!("{pointer}->{member}"),
                (0, None) if field.is_empty() => format!("*{pointer}"),
                (0, None) => format!("(*{pointer}){field}"),
                (i, _) => format!("{pointer}[{i}]{field}"),
            }
        }
    }
}

/// The parts of the bytes from `from` to `to` that no region of `regions`
/// covers, in address order.
fn outside(from: u32, to: u32, regions: &[Region]) -> Vec<(u32, u32)> {
    let mut covered: Vec<(u32, u32)> =
        regions.iter().map(|r| (r.address.max(from), r.address.saturating_add(r.size).min(to))).filter(|(a, b)| a < b).collect();
    covered.sort_unstable();
    let mut pieces = Vec::new();
    let mut at = from;
    for (a, b) in covered {
        if a > at {
            pieces.push((at, a));
        }
        at = at.max(b);
    }
    if at < to {
        pieces.push((at, to));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(address: u32, size: u32) -> Region {
        Region { address, size, what: String::new() }
    }

    #[test]
    fn outside_leaves_what_no_region_covers() {
        assert_eq!(outside(0, 100, &[]), [(0, 100)]);
        assert_eq!(outside(0, 100, &[region(10, 20), region(25, 10), region(90, 50)]), [(0, 10), (35, 90)]);
        assert_eq!(outside(10, 20, &[region(0, 100)]), []);
        assert_eq!(outside(10, 20, &[region(0, 5), region(30, 5)]), [(10, 20)]);
    }
}
