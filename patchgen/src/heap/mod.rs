//! Heap objects whose type changed: which allocations of a paused program
//! must be converted to the new version's layout, how each one's bytes map,
//! and which pointers to them must be rewritten.
//!
//! The host implements [`MemoryView`] over the paused memory; this module
//! knows nothing of wasmtime. Planning an update ([`crate::plan::plan`])
//! lists the [`Roots`] (every global, typed by its DWARF in both versions)
//! before the pause; during the pause the paused frames add theirs
//! ([`frame_roots`]), and [`trace`] walks the allocator's chunks
//! ([`dlmalloc`]) and traces the roots ([`trace`](self::trace)), only when some
//! global's or struct's type differs between the versions or a frame's
//! variable reaches one, so an update that changes no type costs nothing
//! here. The host then allocates every converted object
//! anew through the program's own `malloc`, rewrites the recorded pointers
//! in place, copies each object through its map, and frees the old ones
//! once the update has committed. On every update, traced or not, [`stale`]
//! scans the frames' values, the globals and the live shadow stack for
//! addresses of what moves (a converted global, a frame variable).
//!
//! What is refused (the conservative side): a `void *`, a union or memory
//! no typed pointer reaches that holds the address of a converted object
//! or of a global that moves (typed pointers to it are rewritten); a
//! `void *` or union that holds an allocation no typed pointer reaches whose
//! size fits a changed struct, unless the new version declares what it
//! points to ([`Pointee`]); a
//! pointer whose pointee type changed and that points outside every
//! allocation and global; an allocation reached as two struct types when
//! either changed; a pointer into a member the new version drops. Integers
//! are not taken for pointers inside typed values: C programs that keep
//! addresses in integers must give their structs a transformer.

pub mod dlmalloc;
mod frames;
pub mod stale;
mod trace;

pub use frames::{FrameRoots, FrameValue, frame_pointers, frame_roots, untyped_frame_holder};

use std::collections::HashMap;

use crate::dwarf::{Type, ValueMap, same_type};
use crate::version::{SymbolKey, Version};

/// dlmalloc's state in wasi-libc.
const ALLOCATOR_STATE: &str = "_gm_";

/// Reads a paused program's memory (from two threads while the heap is
/// traced).
pub trait MemoryView: Sync {
    /// Fills `out` from `address`; false when that lies out of bounds.
    fn read(&self, address: u32, out: &mut [u8]) -> bool;

    /// Hints that `address` will be read soon; a view over memory the
    /// process can touch directly starts loading it into the cache.
    fn prefetch(&self, _address: u32) {}

    /// The little-endian word at `address`; `None` when it lies out of
    /// bounds. The tracer reads millions of them one at a time, so a view
    /// that can load a word directly should say so here.
    fn read_u32(&self, address: u32) -> Option<u32> {
        let mut word = [0; 4];
        self.read(address, &mut word).then(|| u32::from_le_bytes(word))
    }
}

/// The 4-byte words of the `size` bytes at `address`, as (address, value),
/// read in one go; none when they lie out of bounds.
pub fn words(memory: &dyn MemoryView, address: u32, size: u32) -> impl Iterator<Item = (u32, u32)> {
    let mut bytes = vec![0; size as usize];
    if !memory.read(address, &mut bytes) {
        bytes.clear();
    }
    (0..bytes.len() / 4).map(move |i| {
        let w = &bytes[4 * i..4 * i + 4];
        (address.wrapping_add(4 * i as u32), u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
    })
}

/// A global the tracer starts from.
#[derive(Debug, Clone)]
pub struct Root {
    /// Its name, for messages.
    pub name: String,
    /// Its running address.
    pub address: u32,
    /// Its size.
    pub size: u32,
    /// Its type in the old version.
    pub old_ty: crate::dwarf::TypeId,
    /// Its type in the new version, when that differs from the old one
    /// (`None`: same type, or the global is gone).
    pub new_ty: Option<crate::dwarf::TypeId>,
}

/// Memory whose words may hold pointers of unknown type.
#[derive(Debug, Clone)]
pub struct Region {
    /// Where it starts.
    pub address: u32,
    /// Its size in bytes.
    pub size: u32,
    /// What it is, for messages.
    pub what: String,
}

/// The roots of a trace, computed with the update's plan.
#[derive(Debug, Clone, Default)]
pub struct Roots {
    /// The globals with debug info.
    pub globals: Vec<Root>,
    /// Writable data without debug info: scanned word by word.
    pub untyped: Vec<Region>,
    /// The new version's C converters, export name by struct tag.
    pub converters: HashMap<String, String>,
    /// Structs whose type differs between the versions, as (tag, old
    /// size): an allocation that only untyped memory reaches may hold one.
    pub changed_structs: Vec<(String, u32)>,
    /// What `void *` members point to, by (struct tag, member), as the new
    /// version declares with `UPSTARE_POINTS_TO` (see [`pointee_hints`]).
    pub pointees: HashMap<(String, String), Pointee>,
}

/// What a `void *` member points to, by the new version's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointee {
    /// A struct: its old type, and its new one when that differs.
    Struct(crate::dwarf::TypeId, Option<crate::dwarf::TypeId>),
    /// Anything else: bytes that hold no object to convert.
    Data,
}

/// The prefix of the globals `UPSTARE_POINTS_TO(tag, member, type)`
/// declares: `upstare_points_to_<tag>__<member>`, of type `type *`.
pub const POINTEE_PREFIX: &str = "upstare_points_to_";

/// The new version's declarations of what `void *` members point to: each
/// global `upstare_points_to_<tag>__<member>` of type `T *` says that
/// member `member` of `struct tag` holds a `T *`. Only its type is read
/// (the global itself is never used), so it need not survive linking.
fn pointee_hints(old: &Version, new: &Version) -> HashMap<(String, String), Pointee> {
    let old_structs: HashMap<&str, crate::dwarf::TypeId> = old.debug.defined_structs().map(|(id, tag)| (tag, id)).collect();
    let mut hints = HashMap::new();
    for g in new.debug.globals() {
        let Some((tag, member)) = g.name.strip_prefix(POINTEE_PREFIX).and_then(|rest| rest.rsplit_once("__")) else { continue };
        let Type::Pointer { to: Some(pointee) } = *new.debug.ty(g.ty) else { continue };
        let hint = match new.debug.ty(pointee) {
            Type::Struct { name: Some(name), .. } => match old_structs.get(name.as_str()) {
                Some(&old_ty) => Pointee::Struct(old_ty, (!same_type(&old.debug, old_ty, &new.debug, pointee)).then_some(pointee)),
                None => Pointee::Data,
            },
            _ => Pointee::Data,
        };
        hints.insert((tag.to_string(), member.to_string()), hint);
    }
    hints
}

/// Structs whose type differs from every definition under their tag in
/// the new version, as (tag, old size); structs the new version no longer
/// defines are left out (no code of the new version can read them).
fn changed_structs(old: &Version, new: &Version) -> Vec<(String, u32)> {
    let mut new_by_tag: HashMap<&str, Vec<crate::dwarf::TypeId>> = HashMap::new();
    for (id, tag) in new.debug.defined_structs() {
        new_by_tag.entry(tag).or_default().push(id);
    }
    let mut changed: Vec<(String, u32)> = old
        .debug
        .defined_structs()
        .filter(|(id, tag)| {
            new_by_tag.get(tag).is_some_and(|news| !news.iter().any(|n| same_type(&old.debug, *id, &new.debug, *n)))
        })
        .filter_map(|(id, tag)| Some((tag.to_string(), u32::try_from(old.debug.size_of(id)?).ok().filter(|s| *s > 0)?)))
        .collect();
    changed.sort();
    changed.dedup();
    changed
}

impl Roots {
    /// Every writable global of `old`, with its type in both versions.
    pub fn of(old: &Version, new: &Version) -> Roots {
        let new_by_key: HashMap<&SymbolKey, u32> = new.data_keys.iter().map(|(i, k)| (k, *i)).collect();
        let new_type = |key: &SymbolKey| {
            let symbol = *new_by_key.get(key)?;
            let own = new.info.symbols[symbol as usize].data()?.address;
            new.debug.global_at(own).filter(|g| g.address == own).map(|g| g.ty)
        };
        let converters = crate::plan::exports_named(&new.wasm, crate::plan::CONVERTER_PREFIX)
            .into_iter()
            .map(|e| (e.name[crate::plan::CONVERTER_PREFIX.len()..].to_string(), e.name))
            .collect();
        // A global with a C transformer is the transformer's to convert:
        // the trace only learns the types behind it.
        let transformed: std::collections::HashSet<String> = crate::plan::exports_named(&new.wasm, crate::plan::TRANSFORMER_PREFIX)
            .into_iter()
            .map(|e| e.name[crate::plan::TRANSFORMER_PREFIX.len()..].to_string())
            .collect();
        let mut roots = Roots {
            converters,
            changed_structs: changed_structs(old, new),
            pointees: pointee_hints(old, new),
            ..Roots::default()
        };
        for (i, s) in old.info.symbols.iter().enumerate() {
            let Some(d) = s.data().filter(|_| !s.is_absolute()) else { continue };
            let writable = d.segment.and_then(|seg| old.info.segments.get(seg as usize)).is_some_and(|seg| seg.writable);
            let Some(key) = old.data_keys.get(&(i as u32)).filter(|_| writable && d.size > 0) else { continue };
            // The allocator's own state points into chunk boundaries, not
            // at objects; the walk reads it, the trace must not rewrite it.
            if key.name == ALLOCATOR_STATE {
                continue;
            }
            let address = old.layout.data.get(&(i as u32)).copied().unwrap_or(d.address);
            match old.debug.global_at(d.address).filter(|g| g.address == d.address) {
                Some(g) => {
                    let new_ty = new_type(key)
                        .filter(|t| !same_type(&old.debug, g.ty, &new.debug, *t))
                        .filter(|_| !transformed.contains(&key.name));
                    roots.globals.push(Root { name: g.name.clone(), address, size: d.size, old_ty: g.ty, new_ty });
                }
                None => roots.untyped.push(Region { address, size: d.size, what: format!("global `{key}`") }),
            }
        }
        roots
    }

    /// Whether some global's or struct's type changed, so that the heap
    /// may hold objects to convert.
    pub fn any_changed(&self) -> bool {
        !self.changed_structs.is_empty() || self.globals.iter().any(|r| r.new_ty.is_some())
    }
}

/// A global that moves because its type changed (see
/// [`crate::plan::Conversion`]): typed pointers to it are rewritten too.
#[derive(Debug, Clone)]
pub struct Moved {
    /// Its name, for messages.
    pub name: String,
    /// Its running address.
    pub old_address: u32,
    /// Its old size.
    pub old_size: u32,
    /// Where the new value goes.
    pub new_address: u32,
    /// How its bytes map.
    pub map: ValueMap,
}

impl Moved {
    /// Whether `address` points into the old copy, or one past its end.
    fn contains(&self, address: u32) -> bool {
        address.wrapping_sub(self.old_address) <= self.old_size
    }

    /// Whether `address` points at a byte of the old copy.
    fn holds(&self, address: u32) -> bool {
        address.wrapping_sub(self.old_address) < self.old_size.max(1)
    }
}

/// How the objects of one changed type convert; shared by all of them.
#[derive(Debug, Clone)]
pub struct ObjectKind {
    /// Old element size.
    pub old_size: u32,
    /// New element size.
    pub new_size: u32,
    /// How one element's bytes map.
    pub map: ValueMap,
    /// The old type, spelled as C.
    pub type_name: String,
    /// The export of the new version's C converter for its struct, run on
    /// each element after the automatic mapping.
    pub converter: Option<String>,
}

/// An allocation to convert: `count` elements of the old type, each
/// becoming one of the new type.
#[derive(Debug, Clone)]
pub struct Object {
    /// The address the program holds.
    pub start: u32,
    /// Number of elements (the chunk's usable size over the element size).
    pub count: u32,
    /// Usable bytes of its chunk (at least `count * old_size`).
    pub chunk_size: u32,
    /// Its type and how it converts, as an index in [`Plan::kinds`]
    /// ([`Plan::kind`]): a million objects share a handful.
    kind: u32,
    /// Its chunk's index in the trace, for [`Plan::path_of`].
    chunk: u32,
}

impl Object {
    /// Where `address` lands once this object (of kind `k`) has its new
    /// copy at `new_start`; `Unmoved` when it lies outside the object's
    /// chunk.
    fn landing(&self, k: &ObjectKind, address: u32, new_start: u32) -> Landing {
        let Some(offset) = address.checked_sub(self.start) else { return Landing::Unmoved };
        let end = self.count * k.old_size;
        if offset == end {
            return Landing::At(new_start + self.count * k.new_size);
        }
        if offset < end {
            let (element, within) = (offset / k.old_size, offset % k.old_size);
            return match map_offset(&k.map, within) {
                Some(to) => Landing::At(new_start + element * k.new_size + to),
                None => Landing::Dropped,
            };
        }
        // In the slack dlmalloc rounds an allocation up with: no element.
        if offset < self.chunk_size { Landing::Dropped } else { Landing::Unmoved }
    }
}

/// How each traced allocation was reached, for messages: kept whole and
/// rendered only when one is needed, since a path costs a walk up the
/// trace and most conversions never print one.
#[derive(Debug, Clone, Default)]
struct Paths {
    roots: Vec<String>,
    origins: Vec<Option<trace::Origin>>,
    /// The member paths [`trace::Name`]s index.
    names: Vec<std::sync::Arc<str>>,
}

impl Paths {
    /// The C expression of member `field` of the traced value `via`.
    fn render(&self, via: trace::Via, field: trace::Name) -> String {
        trace::path(&self.roots, &self.origins, &self.names, via, field)
    }
}

/// What the host must do to the heap for an update.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The allocations to convert, by address.
    pub objects: Vec<Object>,
    /// The types of [`Plan::objects`] and how each converts.
    pub kinds: Vec<ObjectKind>,
    /// Typed pointers found by the trace, as (address of the pointer, value
    /// it holds): each one pointing into a converted object or a moved
    /// global is rewritten.
    pub slots: Vec<(u32, u32)>,
    /// For each slot, the index in `objects` of the object it points into,
    /// with [`AT_START`] when it points at the object's start;
    /// [`UNCONVERTED`] for an allocation that stays, [`NOT_IN_HEAP`] for
    /// anything else (a moved global, or nothing that moves).
    slot_objects: Vec<u32>,
    /// Globals that move.
    pub moved: Vec<Moved>,
    /// How many non-null pointers the trace followed.
    pub pointers_traced: u64,
    /// What converting may write besides the slots and the new copies: the
    /// allocator's own bytes ([`dlmalloc::Chunks::allocator_bytes`]), as
    /// (address, size). With the slots' old values, a copy of these undoes
    /// a conversion exactly.
    pub allocator: Vec<(u32, u32)>,
    /// Allocations in use, and the allocator's segments, for diagnostics.
    pub chunks: (usize, usize),
    /// Allocations no typed pointer reached whose size fits an array of a
    /// struct whose type changed, by address: they may hold such objects,
    /// which the trace could not see and so does not convert. A value that
    /// holds the start of one where no type says what it points to stops
    /// the update ([`Plan::suspect_at`]).
    suspects: Vec<Suspect>,
    /// The tags of the changed structs [`Suspect::tag`] indexes.
    suspect_tags: Vec<String>,
    /// The first word of a shadow stack, outside every typed variable,
    /// that holds the start of a suspect: what holds it, and the suspect.
    pub untyped_stack_holder: Option<(String, Suspicion)>,
    paths: Paths,
}

/// An allocation that may hold objects of a changed struct unseen (see
/// [`Plan::suspects`]); the struct, as an index in [`Plan::suspect_tags`].
#[derive(Debug, Clone, Copy)]
struct Suspect {
    start: u32,
    size: u32,
    tag: u32,
}

/// What [`Plan::suspect_at`] says of an address: an allocation of `size`
/// bytes that may hold objects of `struct tag`, whose type changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspicion {
    /// The allocation's usable bytes.
    pub size: u32,
    /// The changed struct it fits.
    pub tag: String,
}

/// In [`Plan::slot_objects`]: the slot points at its object's start, where
/// its new copy starts too (the common case, decided without reading the
/// object).
const AT_START: u32 = 1 << 31;
/// In [`Plan::slot_objects`]: into an allocation that is not converted.
const UNCONVERTED: u32 = u32::MAX - 1;
/// In [`Plan::slot_objects`]: outside every allocation.
const NOT_IN_HEAP: u32 = u32::MAX;

/// What an entry of [`Plan::slot_objects`] says of its slot.
enum SlotTarget {
    /// Outside every allocation: a moved global, or nothing that moves.
    NotInHeap,
    /// Into an allocation that stays.
    Unconverted,
    /// At the start of this object.
    StartOf(usize),
    /// Somewhere in this object.
    Inside(usize),
}

/// Where an address lands once converted objects are reallocated: the
/// same address when nothing it points into moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Into nothing that moves.
    Unmoved,
    /// At this new address.
    At(u32),
    /// Into bytes the new layout drops.
    Dropped,
}

impl Plan {
    /// Where `address` (old) lands, given the new start of each object of
    /// [`Plan::objects`] in order.
    pub fn translate(&self, address: u32, new_starts: &[u32]) -> Landing {
        let after = self.objects.partition_point(|o| o.start <= address);
        if let Some(i) = after.checked_sub(1) {
            let o = &self.objects[i];
            match o.landing(self.kind(o), address, new_starts[i]) {
                Landing::Unmoved => {}
                landing => return landing,
            }
        }
        // One past a moved global's end has no counterpart the map knows
        // of (its new size is not the map's): dropped.
        match self.moved.iter().find(|m| m.contains(address)) {
            Some(m) => match map_offset(&m.map, address - m.old_address) {
                Some(to) => Landing::At(m.new_address + to),
                None => Landing::Dropped,
            },
            None => Landing::Unmoved,
        }
    }

    /// Where the pointer in slot `i` of [`Plan::slots`] lands: as
    /// [`Plan::translate`], without searching for the object.
    pub fn slot_landing(&self, i: usize, new_starts: &[u32]) -> Landing {
        let value = self.slots[i].1;
        match self.slot_target(i) {
            SlotTarget::NotInHeap => self.translate(value, new_starts),
            SlotTarget::Unconverted => Landing::Unmoved,
            SlotTarget::StartOf(o) => Landing::At(new_starts[o]),
            SlotTarget::Inside(i) => {
                let o = &self.objects[i];
                o.landing(self.kind(o), value, new_starts[i])
            }
        }
    }

    fn slot_target(&self, i: usize) -> SlotTarget {
        match self.slot_objects.get(i).copied().unwrap_or(NOT_IN_HEAP) {
            NOT_IN_HEAP => SlotTarget::NotInHeap,
            UNCONVERTED => SlotTarget::Unconverted,
            o if o & AT_START != 0 => SlotTarget::StartOf((o & !AT_START) as usize),
            o => SlotTarget::Inside(o as usize),
        }
    }

    /// The allocation that starts at `address`, when no typed pointer
    /// reached it and it may hold objects of a changed struct.
    pub fn suspect_at(&self, address: u32) -> Option<Suspicion> {
        let i = self.suspects.partition_point(|s| s.start < address);
        let s = self.suspects.get(i).filter(|s| s.start == address)?;
        Some(Suspicion { size: s.size, tag: self.suspect_tags[s.tag as usize].clone() })
    }

    /// The converted object whose bytes hold `address`, for messages about
    /// a value that would go on pointing at its old copy.
    pub fn object_at(&self, address: u32) -> Option<&Object> {
        let i = self.objects.partition_point(|o| o.start <= address).checked_sub(1)?;
        let o = &self.objects[i];
        (address - o.start < o.chunk_size).then_some(o)
    }

    fn check_slots(&self) -> Result<(), String> {
        let starts: Vec<u32> = self.objects.iter().map(|o| o.start).collect();
        for (i, &(slot, value)) in self.slots.iter().enumerate() {
            // A pointer to an object's start, or into one that stays, lands
            // on something.
            let landed = matches!(self.slot_target(i), SlotTarget::Unconverted | SlotTarget::StartOf(_));
            if !landed && self.slot_landing(i, &starts) == Landing::Dropped {
                return Err(format!(
                    "the pointer at {slot:#x} points into a member that the new version drops ({value:#x})"
                ));
            }
        }
        Ok(())
    }

    /// The type of `o`, one of [`Plan::objects`], and how it converts.
    pub fn kind(&self, o: &Object) -> &ObjectKind {
        &self.kinds[o.kind as usize]
    }

    /// Bytes to allocate for the new copy of `o`, one of [`Plan::objects`].
    pub fn new_bytes(&self, o: &Object) -> u32 {
        o.count.max(1) * self.kind(o).new_size
    }

    /// How `o` was reached from a root, like `conns[3]->next`.
    pub fn path_of(&self, o: &Object) -> String {
        match self.paths.origins.get(o.chunk as usize).and_then(|c| c.as_ref()) {
            Some(c) => self.paths.render(c.from, c.field),
            None => format!("the allocation at {:#x}", o.start),
        }
    }

    /// What `address` would go on pointing at once the update is done,
    /// without a type to rewrite it by: a converted object's old copy, or a
    /// moved global's.
    fn stale(&self, address: u32) -> Option<String> {
        if let Some(o) = self.object_at(address) {
            return Some(format!("an object of changed type {} ({}", self.kind(o).type_name, self.path_of(o)));
        }
        let m = self.moved.iter().find(|m| m.holds(address))?;
        Some(format!("global `{}`, whose type changed (its old copy", m.name))
    }

    /// Refuses when a word of the `size` bytes at `address`, whose type is
    /// unknown (`what` names them), holds an address in a converted object
    /// or a moved global; words at the addresses in `typed` are pointers
    /// the trace rewrites (a frame's typed variable in the shadow stack).
    fn check_words(
        &self,
        memory: &dyn MemoryView,
        address: u32,
        size: u32,
        typed: &rustc_hash::FxHashSet<u32>,
        what: impl FnOnce() -> String,
    ) -> Result<(), String> {
        for (at, value) in words(memory, address, size) {
            if typed.contains(&at) {
                continue;
            }
            if let Some(target) = self.stale(value) {
                return Err(format!(
                    "{} may hold a pointer to {target}, at {value:#x}; the word at {at:#x}): it cannot be rewritten without knowing its type (give it one, or write a transformer)",
                    what(),
                ));
            }
        }
        Ok(())
    }
}

/// Where byte `offset` of an old value goes in the new one.
fn map_offset(map: &ValueMap, offset: u32) -> Option<u32> {
    let offset = u64::from(offset);
    if offset == 0 {
        return Some(0);
    }
    map.copies.iter().find(|c| offset >= c.from && offset < c.from + c.len).map(|c| (c.to + offset - c.from) as u32)
}

/// Traces the heap of the paused program running `old` (see the module
/// docs). `Ok(None)` when no root reaches a changed type: nothing to do.
/// `extra_untyped` are regions the host knows may hold pointers (the live
/// shadow stack, the frames' memory that moves). An `Err` is a refusal,
/// naming why.
pub fn trace(
    old: &Version,
    new: &Version,
    roots: &Roots,
    frames: &FrameRoots,
    moved: Vec<Moved>,
    memory: &dyn MemoryView,
    extra_untyped: Vec<Region>,
) -> Result<Option<Plan>, String> {
    if !roots.any_changed() && !frames.any_changed() {
        return Ok(None);
    }
    let chunks = dlmalloc::walk(old, memory)
        .map_err(|e| format!("the heap cannot be converted: {e}"))?
        .unwrap_or_default();
    let mut untyped = roots.untyped.clone();
    let stacks_from = untyped.len();
    untyped.extend(extra_untyped);
    let mut plan = trace::Tracer::new(&old.debug, &new.debug, memory, &chunks, roots, frames, &moved)
        .run(untyped, stacks_from)
        .map_err(|e| format!("the heap cannot be converted: {e}"))?;
    if !plan.objects.is_empty() {
        plan.allocator = chunks.allocator_bytes();
    }
    plan.chunks = (chunks.all().len(), chunks.segments());
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dwarf::ByteCopy;

    /// `struct { int a; int b; }` becoming `struct { long n; int a; int b; }`
    /// with `b` dropped: `a` moves from 0 to 8.
    fn plan() -> Plan {
        let map = ValueMap { copies: vec![ByteCopy { from: 0, to: 8, len: 4 }], ..ValueMap::default() };
        let kind = ObjectKind { old_size: 8, new_size: 16, map: map.clone(), type_name: "struct s".into(), converter: None };
        let object = Object { start: 0x1000, count: 3, chunk_size: 28, kind: 0, chunk: 0 };
        let moved = Moved { name: "g".into(), old_address: 0x200, old_size: 8, new_address: 0x9000, map };
        Plan { objects: vec![object], kinds: vec![kind], moved: vec![moved], ..Plan::default() }
    }

    #[test]
    fn addresses_land_on_the_same_member_of_the_same_element() {
        let p = plan();
        assert_eq!(p.translate(0x1000, &[0x5000]), Landing::At(0x5000), "the start");
        assert_eq!(p.translate(0x1010, &[0x5000]), Landing::At(0x5020), "element 2");
        assert_eq!(p.translate(0x1018, &[0x5000]), Landing::At(0x5030), "one past the end");
        assert_eq!(p.translate(0x1014, &[0x5000]), Landing::Dropped, "`b` of element 2 is dropped");
        assert_eq!(p.translate(0x101a, &[0x5000]), Landing::Dropped, "the chunk's slack holds no element");
        assert_eq!(p.translate(0x101c, &[0x5000]), Landing::Unmoved, "past the chunk");
        assert_eq!(p.translate(0x0fff, &[0x5000]), Landing::Unmoved);
    }

    #[test]
    fn only_the_start_of_a_suspect_allocation_is_suspect() {
        let suspects = vec![Suspect { start: 0x2000, size: 12, tag: 1 }, Suspect { start: 0x3000, size: 40, tag: 0 }];
        let p = Plan { suspects, suspect_tags: vec!["a".into(), "node".into()], ..Plan::default() };
        assert_eq!(p.suspect_at(0x2000), Some(Suspicion { size: 12, tag: "node".into() }));
        assert_eq!(p.suspect_at(0x3000).map(|s| s.tag), Some("a".into()));
        for inside_or_between in [0x1fff, 0x2004, 0x2fff, 0x3008, 0] {
            assert_eq!(p.suspect_at(inside_or_between), None, "{inside_or_between:#x}");
        }
    }

    #[test]
    fn addresses_in_a_moved_global_follow_it() {
        let p = plan();
        assert_eq!(p.translate(0x200, &[0x5000]), Landing::At(0x9000));
        assert_eq!(p.translate(0x204, &[0x5000]), Landing::Dropped);
        assert_eq!(p.translate(0x208, &[0x5000]), Landing::Dropped, "one past the end: the new size is unknown");
        assert_eq!(p.object_at(0x101b).map(|o| o.start), Some(0x1000));
        assert!(p.object_at(0x101c).is_none());
    }
}
