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
use super::{FrameRoots, MemoryView, Moved, Plan, Pointee, Region, Roots, read_u32};
use crate::dwarf::{DebugInfo, Type, TypeId, ValueMap, same_type, value_map_through_pointers};

/// What `void *` members point to, by (struct tag, member).
type Pointees = std::collections::HashMap<(String, String), Pointee>;

/// What a word inside a value is, for the tracer.
#[derive(Debug, Clone)]
enum FieldKind {
    /// A data pointer to this (old) type.
    Pointer(TypeId),
    /// A `void *` the new version says points to this struct (old type),
    /// converted to this new one when it changed (`UPSTARE_POINTS_TO`).
    Declared(TypeId, Option<TypeId>),
    /// Bytes that may hold a pointer of unknown type (`void *`, a union).
    Untyped(u32),
}

#[derive(Debug, Clone)]
struct Field {
    offset: u32,
    kind: FieldKind,
    /// Member path from the value, like `.next` or `.slots[3]`.
    path: Arc<str>,
}

/// A value being traced: a root, or one element of an allocation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Via {
    Root(usize),
    Object { chunk: usize, element: u32 },
}

/// The type an allocation was given.
#[derive(Debug, Clone)]
pub(super) struct Claim {
    old: TypeId,
    new: Option<TypeId>,
    /// Whether the type has members (a struct, union, array or pointer), as
    /// opposed to plain bytes.
    shaped: bool,
    /// The value holding the first pointer that gave this type, and the
    /// pointer's member path in it, for messages.
    pub(super) from: Via,
    pub(super) field: Arc<str>,
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
    claims: Vec<Option<Claim>>,
    fields: HashMap<TypeId, Arc<Vec<Field>>>,
    pairs: HashMap<(TypeId, TypeId), Arc<(ValueMap, HashMap<u64, TypeId>)>>,
    work: Vec<(u32, TypeId, Option<TypeId>, Via)>,
    slots: Vec<(u32, u32)>,
    /// The allocation each slot points into, or `u32::MAX`.
    slot_chunks: Vec<u32>,
    /// `void *` and union members met while tracing, named lazily.
    untyped: Vec<(u32, u32, Via, Arc<str>)>,
    inside: Vec<Inside>,
    /// One description per changed type pair, shared by its objects.
    kinds: HashMap<(TypeId, TypeId), Arc<super::ObjectKind>>,
    pointers: u64,
}

/// A pointer to a changed type into the middle of an allocation.
struct Inside {
    chunk: usize,
    value: u32,
    pointee: TypeId,
    from: Via,
    field: Arc<str>,
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
            claims: vec![None; chunks.all().len()],
            fields: HashMap::default(),
            pairs: HashMap::default(),
            work: Vec::new(),
            slots: Vec::new(),
            slot_chunks: Vec::new(),
            untyped: Vec::new(),
            inside: Vec::new(),
            kinds: HashMap::default(),
            pointers: 0,
        }
    }

    /// Traces from every root and plans the conversion. `untyped` are the
    /// regions outside the heap whose words may hold pointers.
    pub(super) fn run(mut self, untyped: Vec<Region>) -> Result<Plan, String> {
        let frames = self.frames;
        for (i, root) in self.roots.globals.iter().chain(&frames.memory).enumerate() {
            self.work.push((root.address, root.old_ty, root.new_ty, Via::Root(i)));
        }
        let first_value = self.roots.globals.len() + frames.memory.len();
        let no_field: Arc<str> = Arc::from("");
        for (i, v) in frames.values.iter().enumerate() {
            self.pointers += 1;
            self.pointer(None, v.value, v.pointee, v.new_pointee, Via::Root(first_value + i), &no_field)?;
        }
        while let Some((at, old, new, via)) = self.work.pop() {
            self.visit(at, old, new, via)?;
        }
        if !self.roots.changed_structs.is_empty() {
            for &(address, size, via, ref field) in &self.untyped {
                self.check_untyped(address, size, via, field)?;
            }
        }
        for i in &self.inside {
            if !self.claims[i.chunk].as_ref().is_some_and(|c| c.new.is_some()) {
                let c = self.chunks.all()[i.chunk];
                return Err(format!(
                    "{} points {} bytes into an allocation of {} bytes whose type the trace cannot tell, where an object of changed type {} cannot be converted (an allocator wrapper that keeps a header before each object hides it)",
                    path(&self.root_names, &self.claims, i.from, &i.field),
                    i.value - c.start,
                    c.size,
                    self.old.type_name(i.pointee)
                ));
            }
        }
        let mut objects = Vec::new();
        for chunk in 0..self.claims.len() {
            let Some(Claim { old, new: Some(new), from, field, .. }) = self.claims[chunk].clone() else { continue };
            let Some(kind) = self.kind(old, new, from, &field)? else { continue };
            let c = self.chunks.all()[chunk];
            objects.push(super::Object {
                start: c.start,
                count: c.size / kind.old_size,
                chunk_size: c.size,
                chunk,
                kind,
            });
        }
        let paths = super::Paths { roots: self.root_names, claims: self.claims };
        let mut object_of_chunk = vec![u32::MAX; self.chunks.all().len()];
        for (i, o) in objects.iter().enumerate() {
            object_of_chunk[o.chunk] = i as u32;
        }
        let slot_objects = self.slot_chunks.iter().map(|&c| object_of_chunk.get(c as usize).copied().unwrap_or(u32::MAX)).collect();
        let plan = Plan {
            objects,
            slots: self.slots,
            slot_objects,
            moved: self.moved.to_vec(),
            pointers_traced: self.pointers,
            allocator: Vec::new(),
            chunks: (0, 0),
            paths,
        };
        if !plan.objects.is_empty() {
            // In the untyped regions, the words the frames' DWARF accounts
            // for: pointers the trace rewrites, bytes of typed variables
            // (not pointers, as inside any typed value), dead variables.
            let mut known: rustc_hash::FxHashSet<u32> = plan.slots.iter().map(|&(slot, _)| slot).collect();
            let spans = self.frames.memory.iter().map(|r| (r.address, r.size)).chain(self.frames.dead.iter().copied());
            for (address, size) in spans {
                known.extend((address..address.saturating_add(size)).step_by(4));
            }
            for r in &untyped {
                plan.check_words(self.memory, r.address, r.size, &known, || r.what.clone())?;
            }
            let none = rustc_hash::FxHashSet::default();
            for &(address, size, via, ref field) in &self.untyped {
                plan.check_words(self.memory, address, size, &none, || path(&plan.paths.roots, &plan.paths.claims, via, field))?;
            }
            for (chunk, claim) in plan.paths.claims.iter().enumerate() {
                if claim.is_none() && !self.chunks.is_internal(chunk) {
                    let c = self.chunks.all()[chunk];
                    plan.check_words(self.memory, c.start, c.size, &none, || {
                        format!("an allocation at {:#x} that no typed pointer reaches", c.start)
                    })?;
                }
            }
        }
        plan.check_slots()?;
        Ok(plan)
    }

    /// Refuses when the `size` bytes at `address`, a `void *` or a union
    /// (`field` of `via`), hold the start of an allocation that no typed
    /// pointer reached and whose size fits an array of some struct whose
    /// type changed: what it holds cannot be told, so it could not be
    /// converted.
    fn check_untyped(&self, address: u32, size: u32, via: Via, field: &str) -> Result<(), String> {
        let mut bytes = vec![0; size as usize];
        if !self.memory.read(address, &mut bytes) {
            return Ok(());
        }
        for word in bytes.chunks_exact(4) {
            let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            let Some(chunk) = self.chunks.containing(value).filter(|&c| !self.chunks.is_internal(c)) else { continue };
            let c = self.chunks.all()[chunk];
            if c.start != value || self.claims[chunk].is_some() {
                continue;
            }
            if let Some((tag, _)) = self.roots.changed_structs.iter().find(|(_, s)| fits(c.size, *s)) {
                return Err(format!(
                    "{} points to an allocation of {} bytes whose type no typed pointer tells: it may hold `struct {tag}`, whose type changed, and would not be converted (declare what it points to with UPSTARE_POINTS_TO in the new version)",
                    path(&self.root_names, &self.claims, via, field),
                    c.size
                ));
            }
        }
        Ok(())
    }

    /// What converting objects of `old` to `new` takes; `None` when their
    /// bytes need not move (only pointers inside them change type).
    fn kind(&mut self, old: TypeId, new: TypeId, from: Via, field: &str) -> Result<Option<Arc<super::ObjectKind>>, String> {
        if let Some(k) = self.kinds.get(&(old, new)) {
            return Ok(Some(k.clone()));
        }
        let Some(pair) = self.pair(old, new) else {
            let root = format!("*{}", path(&self.root_names, &self.claims, from, field));
            return Err(self.unmappable(old, new, &root));
        };
        let (old_size, new_size) = (self.size(self.old, old)?, self.size(self.new, new)?);
        if pair.0.is_whole_copy(old_size, new_size) {
            return Ok(None);
        }
        let kind = Arc::new(super::ObjectKind {
            old_size,
            new_size,
            map: pair.0.clone(),
            type_name: self.old.type_name(old),
            converter: match self.old.ty(old) {
                Type::Struct { name: Some(tag), .. } => self.roots.converters.get(tag).cloned(),
                _ => None,
            },
        });
        self.kinds.insert((old, new), kind.clone());
        Ok(Some(kind))
    }

    fn size(&self, debug: &DebugInfo, ty: TypeId) -> Result<u32, String> {
        match debug.size_of(ty) {
            Some(s) if s > 0 => u32::try_from(s).map_err(|_| format!("type {} is too large", debug.type_name(ty))),
            _ => Err(format!("objects of type {} have no known size", debug.type_name(ty))),
        }
    }

    fn visit(&mut self, at: u32, old: TypeId, new: Option<TypeId>, via: Via) -> Result<(), String> {
        let fields = self.fields_of(old);
        let pair = match new {
            Some(new) => match self.pair(old, new) {
                Some(pair) => Some(pair),
                None => return Err(self.unmappable(old, new, &path(&self.root_names, &self.claims, via, ""))),
            },
            None => None,
        };
        for f in fields.iter() {
            let slot = at.wrapping_add(f.offset);
            match &f.kind {
                FieldKind::Untyped(size) => self.untyped.push((slot, *size, via, f.path.clone())),
                FieldKind::Pointer(_) | FieldKind::Declared(..) => {
                    let Some(value) = read_u32(self.memory, slot) else {
                        return Err(format!("{} lies outside memory", path(&self.root_names, &self.claims, via, &f.path)));
                    };
                    if value == 0 {
                        continue;
                    }
                    self.pointers += 1;
                    let (pointee, new_pointee) = match f.kind {
                        FieldKind::Declared(old, new) => (old, new),
                        FieldKind::Pointer(old) => (old, pair.as_ref().and_then(|p| p.1.get(&u64::from(f.offset)).copied())),
                        FieldKind::Untyped(_) => unreachable!("matched above"),
                    };
                    self.pointer(Some(slot), value, pointee, new_pointee, via, &f.path)?;
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
        field: &Arc<str>,
    ) -> Result<(), String> {
        if let Some(chunk) = self.chunks.containing(value).filter(|&c| !self.chunks.is_internal(c)) {
            if let Some(slot) = slot {
                self.slots.push((slot, value));
                self.slot_chunks.push(chunk as u32);
            }
            if value != self.chunks.all()[chunk].start {
                // Into the allocation, not at its start (an element, a
                // member): an alias, rewritten with whatever the allocation
                // turns out to be. Only the pointer `malloc` returned, or a
                // copy of it, says what the allocation is; a pointer to a
                // changed type must find that it was converted.
                if new_pointee.is_some() {
                    self.inside.push(Inside { chunk, value, pointee, from: via, field: field.clone() });
                }
                return Ok(());
            }
            return self.claim(chunk, pointee, new_pointee, via, field.clone());
        }
        let Some(slot) = slot else {
            // A local pointing outside the heap: the frame checks of the
            // update see to globals that move and to the shadow stack.
            return Ok(());
        };
        if self.moved.iter().any(|m| m.contains(value)) {
            self.slots.push((slot, value));
            self.slot_chunks.push(u32::MAX);
            return Ok(());
        }
        if new_pointee.is_some() {
            // Not an allocation: a global of the same type, the shadow stack
            // or memory the tracer cannot see. A pointer whose pointee type
            // changed must not go on pointing at an old layout unseen.
            let path = path(&self.root_names, &self.claims, via, field);
            if !self.roots.globals.iter().any(|r| value >= r.address && value - r.address < r.size.max(1)) {
                return Err(format!(
                    "{path} points to {value:#x}, outside every allocation and global, at an object of changed type {}",
                    self.old.type_name(pointee)
                ));
            }
        }
        Ok(())
    }

    /// Gives `chunk` the type `old` (converted to `new`), tracing its
    /// elements the first time it is given a shape.
    fn claim(&mut self, chunk: usize, old: TypeId, new: Option<TypeId>, from: Via, field: Arc<str>) -> Result<(), String> {
        let shaped = !matches!(self.old.ty(old), Type::Base { .. } | Type::Enum { .. } | Type::Unknown | Type::Function);
        let expand = match &self.claims[chunk] {
            None => true,
            Some(c) if !c.shaped && shaped => true,
            Some(c) if !shaped || !c.shaped => false,
            Some(c) => {
                if same_type(self.old, c.old, self.old, old) {
                    // Reached again as the same type; a pair found now where
                    // the first visit saw none is converted all the same.
                    c.new.is_none() && new.is_some()
                } else if c.new.is_some() || new.is_some() {
                    return Err(format!(
                        "the allocation at {:#x} is reached as {} ({}) and as {} ({}), and one of the two types changed",
                        self.chunks.all()[chunk].start,
                        self.old.type_name(c.old),
                        path(&self.root_names, &self.claims, c.from, &c.field),
                        self.old.type_name(old),
                        path(&self.root_names, &self.claims, from, &field),
                    ));
                } else {
                    false
                }
            }
        };
        if !expand {
            return Ok(());
        }
        self.claims[chunk] = Some(Claim { old, new, shaped, from, field });
        let c = self.chunks.all()[chunk];
        let size = self.old.size_of(old).unwrap_or(0) as u32;
        if size == 0 {
            return Ok(());
        }
        if size > c.size && new.is_some() {
            let claim = self.claims[chunk].as_ref().expect("just made");
            return Err(format!(
                "{} points to an allocation of {} bytes, smaller than its type {} ({size} bytes)",
                path(&self.root_names, &self.claims, claim.from, &claim.field),
                c.size,
                self.old.type_name(old)
            ));
        }
        if !self.fields_of(old).is_empty() {
            for i in 0..c.size / size {
                self.work.push((c.start + i * size, old, new, Via::Object { chunk, element: i }));
            }
        }
        Ok(())
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

    fn fields_of(&mut self, ty: TypeId) -> Arc<Vec<Field>> {
        if let Some(f) = self.fields.get(&ty) {
            return f.clone();
        }
        let mut out = Vec::new();
        collect_fields(self.old, &self.roots.pointees, ty, 0, "", &mut out, 0);
        let f = Arc::new(out);
        self.fields.insert(ty, f.clone());
        f
    }
}

/// Whether an allocation of `usable` bytes may be an array of elements of
/// `size` bytes: dlmalloc rounds a request up by less than its alignment.
fn fits(usable: u32, size: u32) -> bool {
    usable >= size && usable % size < super::dlmalloc::ALIGN
}

/// Nesting deeper than this is a type this reader does not follow.
const MAX_DEPTH: u32 = 32;

fn collect_fields(debug: &DebugInfo, pointees: &Pointees, ty: TypeId, at: u32, path: &str, out: &mut Vec<Field>, depth: u32) {
    let untyped = |out: &mut Vec<Field>, size: u64| {
        out.push(Field { offset: at, kind: FieldKind::Untyped(size as u32), path: Arc::from(path) });
    };
    if depth > MAX_DEPTH {
        return untyped(out, debug.size_of(ty).unwrap_or(0));
    }
    match debug.ty(ty) {
        Type::Base { .. } | Type::Enum { .. } | Type::Function => {}
        Type::Pointer { to: None } => untyped(out, 4),
        Type::Pointer { to: Some(p) } => {
            if !matches!(debug.ty(*p), Type::Function) {
                out.push(Field { offset: at, kind: FieldKind::Pointer(*p), path: Arc::from(path) });
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
                    Some(Pointee::Struct(old, new)) => out.push(Field {
                        offset: at + m.offset as u32,
                        kind: FieldKind::Declared(*old, *new),
                        path: Arc::from(member_path),
                    }),
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
                for f in &inner {
                    out.push(Field {
                        offset: at + (i * size) as u32 + f.offset,
                        kind: f.kind.clone(),
                        path: Arc::from(format!("{path}[{i}]{}", f.path)),
                    });
                }
            }
        }
        Type::Unknown => untyped(out, debug.size_of(ty).unwrap_or(4)),
    }
}

/// The C expression of `field` in the traced value `via`, from its root,
/// for messages: `conns[3]->next->buf`.
pub(super) fn path(roots: &[String], claims: &[Option<Claim>], via: Via, field: &str) -> String {
    path_within(roots, claims, via, field, 0)
}

fn path_within(roots: &[String], claims: &[Option<Claim>], via: Via, field: &str, depth: u32) -> String {
    // A claim upgraded from bytes to a struct may name a value reached
    // through itself; a long path says nothing more anyway.
    if depth > 32 {
        return format!("...{field}");
    }
    match via {
        Via::Root(r) => format!("{}{field}", roots[r]),
        Via::Object { chunk, element } => {
            let Some(c) = claims.get(chunk).and_then(|c| c.as_ref()) else { return format!("?{field}") };
            let pointer = path_within(roots, claims, c.from, &c.field, depth + 1);
            match (element, field.strip_prefix('.')) {
                (0, Some(member)) => format!("{pointer}->{member}"),
                (0, None) if field.is_empty() => format!("*{pointer}"),
                (0, None) => format!("(*{pointer}){field}"),
                (i, _) => format!("{pointer}[{i}]{field}"),
            }
        }
    }
}
