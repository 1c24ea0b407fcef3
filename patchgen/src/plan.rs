//! The update plan: what becomes of each function, data symbol, table slot
//! and wasm global of the running version, and whether the update is safe.
//!
//! Data placement follows one rule: state stays where it is. A writable
//! symbol (`.data`, `.bss`) the new version shares with the old one, with
//! the same type, keeps its running address, so every pointer to it stays
//! valid and nothing is copied. Everything else goes to *fresh memory*,
//! pages the host adds above the running heap: the new version's read-only
//! data (its string literals may have changed; the old ones stay where they
//! are for any pointer still holding them), its new writable symbols (with
//! their initial values), and globals whose type changed, rebuilt field by
//! field from the old value. Table slots work the same way: a function the
//! old table held keeps its slot, so function pointers stored anywhere in
//! memory still call the same function; new ones take free slots.
//!
//! The plan is computed before the program pauses and placed at a fresh
//! base address with [`Plan::link`], which also produces the relinked
//! module.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::diff::{match_functions, FunctionMatch};
use crate::dwarf::{same_type, value_map_through_pointers, ValueMap};
use crate::relink::{relink, relocated_bytes, Placement};
use crate::version::{Layout, SymbolKey, Version};

/// Prefix of the export name of a state transformer written in C: the new
/// version exports `upstare_transform_<global>(const void *old, void *new)`
/// (see `guest-examples/include/upstare.h`).
pub const TRANSFORMER_PREFIX: &str = "upstare_transform_";

/// Prefix of the export name of a converter written in C for the heap
/// objects of a struct: `upstare_convert_<tag>(const void *old, void *new)`
/// (see `guest-examples/include/upstare.h` and [`crate::heap`]).
pub const CONVERTER_PREFIX: &str = "upstare_convert_";

/// Alignment of every object placed in fresh memory: the largest alignment
/// a wasm32 C type has (`long double`).
const FRESH_ALIGN: u32 = 16;

/// Why an update cannot be planned at all (as opposed to a refusal, which
/// the plan reports).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A module could not be read.
    #[error(transparent)]
    Version(#[from] crate::version::Error),
    /// A function body could not be compared.
    #[error(transparent)]
    Body(#[from] crate::body::Error),
    /// Relinking failed.
    #[error(transparent)]
    Relink(#[from] crate::relink::Error),
    /// A data symbol of the new version lies in no object the plan places.
    #[error("data symbol `{name}` (at {address:#x} in the new module) lies in no object the plan places")]
    Unplaced {
        /// The symbol's name.
        name: String,
        /// Its address in the new module's own layout.
        address: u32,
    },
    /// A section walked from `__start_` to `__stop_` would come apart.
    #[error("the program walks section `{0}` from `__start_{0}` to `__stop_{0}`, but its objects would not stay side by side: some keep their running address and others go to fresh memory (keep the section's entries the same, or add new entries only in a new section)")]
    SplitSection(String),
}

/// What becomes of one writable data symbol of the new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataFate {
    /// Shared with the old version, same type: stays at its running address.
    Kept {
        /// The running address.
        address: u32,
    },
    /// Only in the new version: fresh memory, initial value from the module.
    Added {
        /// Offset in fresh memory.
        fresh: u32,
    },
    /// Shared, but its type changed: rebuilt in fresh memory from the old
    /// value by `map` (and the C transformer, if the new version has one).
    Converted {
        /// The old value's running address.
        old_address: u32,
        /// The old value's size.
        old_size: u32,
        /// Offset of the new value in fresh memory.
        fresh: u32,
        /// How the old value's bytes become the new one's.
        map: ValueMap,
        /// Export name of the C transformer for it, if any.
        transformer: Option<String>,
    },
}

/// One writable data object of the new version and its fate.
#[derive(Debug, Clone)]
pub struct DataPlan {
    /// Its symbol index in the new module.
    pub symbol: u32,
    /// Its key.
    pub key: SymbolKey,
    /// Its size.
    pub size: u32,
    /// What happens to it.
    pub fate: DataFate,
}

/// A complete plan: its parts, and the reasons it must be refused (empty
/// when it is safe).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The running version.
    pub old: Arc<Version>,
    /// The new version, not yet placed.
    pub new: Arc<Version>,
    /// How the functions correspond.
    pub functions: FunctionMatch,
    /// Every writable data object of the new version that is not inside
    /// another one.
    pub data: Vec<DataPlan>,
    /// Keys of writable objects only the old version had.
    pub removed: Vec<SymbolKey>,
    /// Fresh offsets of the new version's read-only segments, by segment
    /// index.
    pub rodata: Vec<(usize, u32)>,
    /// Bytes of fresh memory the new version needs.
    pub fresh_size: u32,
    /// The new table: slot -> new function index.
    pub table: BTreeMap<u32, u32>,
    /// Mutable wasm globals carried over: (new index, old index).
    pub globals: Vec<(u32, u32)>,
    /// The new version's constructors that run at the update, in order
    /// (function indices of the new module; see [`crate::constructors`]).
    pub constructors: Vec<u32>,
    /// The globals the heap tracer starts from during the pause.
    pub heap_roots: crate::heap::Roots,
    /// Why the update must be refused; empty when it is safe.
    pub refusals: Vec<String>,
}

/// The plan placed at a fresh base address.
#[derive(Debug, Clone)]
pub struct Linked {
    /// The new module relinked against the running layout.
    pub wasm: Vec<u8>,
    /// The new version with its final layout: the running version once the
    /// update commits.
    pub version: Version,
    /// Bytes to write into fresh memory: (address, bytes).
    pub writes: Vec<(u32, Vec<u8>)>,
    /// Converted globals.
    pub conversions: Vec<Conversion>,
    /// The constructors to run at the update, in order: (export name in
    /// the relinked module, function name).
    pub constructors: Vec<(String, String)>,
}

/// A global whose type changed, placed: where its old value is and where
/// the new one goes.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// Its key.
    pub key: SymbolKey,
    /// The old value's address.
    pub old_address: u32,
    /// The old value's size.
    pub old_size: u32,
    /// The new value's address.
    pub new_address: u32,
    /// How the old value's bytes become the new one's.
    pub map: ValueMap,
    /// Export name of the C transformer for it, if any.
    pub transformer: Option<String>,
}

/// Plans the update from `old` (running) to the module `new_wasm`.
pub fn plan(old: Arc<Version>, new_wasm: Arc<Vec<u8>>) -> Result<Plan, Error> {
    let new = Arc::new(Version::unplaced(new_wasm)?);
    let functions = match_functions(&old, &new)?;
    // Transformer export names, by the global they transform.
    let transformers: HashMap<String, String> = exports_named(&new.wasm, TRANSFORMER_PREFIX)
        .into_iter()
        .map(|e| (e.name[TRANSFORMER_PREFIX.len()..].to_string(), e.name))
        .collect();
    let mut refusals = Vec::new();
    let mut fresh = Fresh::default();

    let rodata: Vec<(usize, u32)> = new
        .info
        .segments
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.writable)
        .map(|(i, s)| (i, fresh.take(s.size)))
        .collect();

    let old_by_key: HashMap<&SymbolKey, u32> = old.data_keys.iter().map(|(i, k)| (k, *i)).collect();
    let mut data = Vec::new();
    let mut matched_old = HashSet::new();
    // Objects added side by side in one segment stay side by side in fresh
    // memory, so a section walked from `__start_` to `__stop_` stays whole:
    // (segment, own address of the run's first object, its fresh offset).
    let mut run: Option<(Option<u32>, u32, u32)> = None;
    for (root, aliases) in writable_roots(&new) {
        let def = new.info.symbols[root as usize].data().cloned().expect("roots are data symbols");
        // An alias the new version adds (or drops) must not make the object
        // look new: any of its names that the old version has will do.
        let counterpart = std::iter::once(root)
            .chain(aliases)
            .find_map(|s| old_by_key.get(&new.data_keys[&s]).map(|&old_symbol| (s, old_symbol)));
        let key = new.data_keys[&counterpart.map_or(root, |(s, _)| s)].clone();
        let transformer = transformers.get(&key.name).cloned();
        let fate = match counterpart {
            None => {
                let at = match run {
                    Some((segment, own, at)) if segment == def.segment => fresh.place(at + (def.address - own), def.size),
                    // Congruent to its own address modulo the largest
                    // alignment, so every object the run adds later is
                    // aligned as in the module.
                    _ => fresh.place(fresh.end.next_multiple_of(FRESH_ALIGN) + def.address % FRESH_ALIGN, def.size),
                };
                run = Some(run.filter(|r| r.0 == def.segment).unwrap_or((def.segment, def.address, at)));
                DataFate::Added { fresh: at }
            }
            Some((_, old_symbol)) => {
                run = None;
                matched_old.insert(old_symbol);
                let old_def = old.info.symbols[old_symbol as usize].data().cloned().expect("keys name data symbols");
                let old_address = old.layout.data.get(&old_symbol).copied().unwrap_or(old_def.address);
                let old_size = old_def.size;
                match compare_types(&old, old_def.address, old_def.size, &new, def.address, def.size, &key) {
                    Ok(None) if transformer.is_none() => DataFate::Kept { address: old_address },
                    // Only what it points to changed: it stays, and the heap
                    // tracer rewrites its pointers.
                    Ok(Some(map)) if transformer.is_none() && map.is_whole_copy(old_size, def.size) => {
                        DataFate::Kept { address: old_address }
                    }
                    Ok(None) => DataFate::Converted {
                        old_address,
                        old_size,
                        fresh: fresh.take(def.size),
                        map: identity_map(def.size),
                        transformer,
                    },
                    Ok(Some(map)) => DataFate::Converted { old_address, old_size, fresh: fresh.take(def.size), map, transformer },
                    Err(_) if transformer.is_some() => {
                        // The user's transformer takes over what no automatic
                        // mapping can do; the value starts zeroed.
                        DataFate::Converted {
                            old_address,
                            old_size,
                            fresh: fresh.take(def.size),
                            map: ValueMap::default(),
                            transformer,
                        }
                    }
                    Err(reason) => {
                        refusals.push(reason);
                        DataFate::Kept { address: old_address }
                    }
                }
            }
        };
        data.push(DataPlan { symbol: root, key, size: def.size, fate });
    }
    let removed: Vec<SymbolKey> = writable_roots(&old)
        .into_iter()
        .filter(|(root, aliases)| !std::iter::once(root).chain(aliases).any(|s| matched_old.contains(s)))
        .map(|(root, _)| old.data_keys[&root].clone())
        .collect();

    refuse_changed_splits(&old, &new, &mut refusals);
    refuse_changed_thread_locals(&old, &new, &mut refusals);
    let table = plan_table(&old, &new, &mut refusals);
    let globals = carried_globals(&old, &new);
    let constructors = crate::constructors::added(&old, &new);
    let fresh_size = fresh.end.next_multiple_of(FRESH_ALIGN);
    let heap_roots = crate::heap::Roots::of(&old, &new);
    let mut plan =
        Plan { old, new, functions, data, removed, rodata, fresh_size, table, globals, constructors, heap_roots, refusals };
    // The relink is part of the verdict: what cannot be relinked is refused
    // here, not found out by the host after it reserved memory. Nothing it
    // checks depends on where fresh memory starts, so any base will do.
    if plan.refusals.is_empty() {
        if let Err(e) = plan.link(nominal_fresh_base(&plan.old)) {
            plan.refusals.push(format!("cannot relink: {e}"));
        }
    }
    Ok(plan)
}

/// The plan of updating a running version to its own module with every
/// function treated as changed, for `upstare-host --stress-update`: every
/// object stays where it is, every mutable wasm global carries over, nothing
/// is relinked (the running module is already linked where it runs), and
/// only the frames move, by the rules for changed code.
pub fn onto_itself(version: Arc<Version>) -> Result<(Plan, Linked), Error> {
    let mut functions = match_functions(&version, &version)?;
    functions.changed = std::mem::take(&mut functions.unchanged)
        .into_iter()
        .map(|f| version.function_keys[f as usize].to_string())
        .collect();
    let data = writable_roots(&version)
        .into_iter()
        .filter_map(|(root, _)| {
            let def = version.info.symbols[root as usize].data()?;
            let address = version.layout.data.get(&root).copied().unwrap_or(def.address);
            Some(DataPlan { symbol: root, key: version.data_keys[&root].clone(), size: def.size, fate: DataFate::Kept { address } })
        })
        .collect();
    // By index: a global the name section leaves unnamed carries over too.
    let globals = version.info.globals.iter().enumerate().filter(|(_, g)| g.mutable).map(|(i, _)| (i as u32, i as u32)).collect();
    let linked = Linked {
        wasm: version.wasm.to_vec(),
        version: (*version).clone(),
        writes: Vec::new(),
        conversions: Vec::new(),
        constructors: Vec::new(),
    };
    let plan = Plan {
        old: version.clone(),
        new: version.clone(),
        functions,
        data,
        removed: Vec::new(),
        rodata: Vec::new(),
        fresh_size: 0,
        table: version.layout.table.clone(),
        globals,
        constructors: Vec::new(),
        heap_roots: crate::heap::Roots::default(),
        refusals: Vec::new(),
    };
    Ok((plan, linked))
}

/// Fresh memory as the plan hands it out: offsets from its base.
#[derive(Default)]
struct Fresh {
    end: u32,
}

impl Fresh {
    /// `size` bytes at the next aligned offset.
    fn take(&mut self, size: u32) -> u32 {
        self.place(self.end.next_multiple_of(FRESH_ALIGN), size)
    }

    /// `size` bytes at `at`, which lies at or past what was handed out.
    fn place(&mut self, at: u32, size: u32) -> u32 {
        self.end = self.end.max(at + size);
        at
    }
}

/// Where the host would put fresh memory for a program that has not grown
/// its memory since it started: the first page above its heap base.
fn nominal_fresh_base(old: &Version) -> u32 {
    old.info.heap_base.unwrap_or(1 << 20).next_multiple_of(1 << 16)
}

impl Plan {
    /// Whether the update is safe to apply.
    pub fn is_safe(&self) -> bool {
        self.refusals.is_empty()
    }

    /// Places the plan's fresh memory at `fresh_base` and relinks the new
    /// module accordingly.
    pub fn link(&self, fresh_base: u32) -> Result<Linked, Error> {
        let new = &self.new;
        let mut placement =
            Placement { data: HashMap::new(), table: self.table.clone(), exports: transformer_targets(&new.info, &user_code_exports(&new.wasm)), added_exports: Vec::new() };
        let constructors: Vec<(String, String)> = self
            .constructors
            .iter()
            .enumerate()
            .map(|(n, &f)| (format!("{}{n}", crate::constructors::EXPORT_PREFIX), new.info.function_name(f)))
            .collect();
        placement.added_exports = constructors.iter().zip(&self.constructors).map(|((export, _), &f)| (export.clone(), f)).collect();
        let old_absolute = absolute_symbols(&self.old);
        for (i, symbol) in new.info.symbols.iter().enumerate() {
            let Some(def) = symbol.data() else { continue };
            let name = || symbol.name.clone().unwrap_or_default();
            let address = match def.segment {
                Some(segment) => self
                    .place_in_segment(segment, def.address, fresh_base)
                    .ok_or_else(|| Error::Unplaced { name: name(), address: def.address })?,
                None => match section_bound(&new.info, symbol.name.as_deref()) {
                    // `__start_S` / `__stop_S`: where section S is now.
                    Some(segment) => def.address.wrapping_add_signed(self.segment_shift(segment, fresh_base)?),
                    // `__heap_base` and friends describe the running layout.
                    None => symbol.name.as_ref().and_then(|n| old_absolute.get(n)).copied().unwrap_or(def.address),
                },
            };
            placement.data.insert(i as u32, address);
        }
        let wasm = relink(&new.wasm, &new.info, &placement)?;

        let mut writes = Vec::new();
        for &(segment, offset) in &self.rodata {
            let range = new.info.segments[segment].addresses();
            writes.push((fresh_base + offset, relocated_bytes(&new.info, &placement, range)?));
        }
        let mut conversions = Vec::new();
        for d in &self.data {
            let def = new.info.symbols[d.symbol as usize].data().expect("data symbol");
            match &d.fate {
                DataFate::Kept { .. } => {}
                DataFate::Added { fresh } => {
                    let in_init = new.info.segment_at(def.address).is_some_and(|s| !new.info.segments[s].init.is_empty());
                    if in_init {
                        let bytes = relocated_bytes(&new.info, &placement, def.address..def.address + def.size)?;
                        writes.push((fresh_base + fresh, bytes));
                    }
                }
                DataFate::Converted { old_address, old_size, fresh, map, transformer } => {
                    conversions.push(Conversion {
                        key: d.key.clone(),
                        old_address: *old_address,
                        old_size: *old_size,
                        new_address: fresh_base + fresh,
                        map: map.clone(),
                        transformer: transformer.clone(),
                    });
                }
            }
        }
        let mut version = (**new).clone();
        version.layout = Layout { data: placement.data, table: self.table.clone() };
        Ok(Linked { wasm, version, writes, conversions, constructors })
    }

    /// The final address of the new module's address `addr` (its own
    /// layout) in `segment`: in the segment's fresh copy if it is
    /// read-only, else in the object of the plan containing it (or ending
    /// at it: a pointer one past an object).
    fn place_in_segment(&self, segment: u32, addr: u32, fresh_base: u32) -> Option<u32> {
        let info = &self.new.info;
        let seg = info.segments.get(segment as usize)?;
        if let Some(&(_, offset)) = self.rodata.iter().find(|(s, _)| *s == segment as usize) {
            return Some(fresh_base + offset + addr.checked_sub(seg.address)?);
        }
        let in_segment = |d: &&DataPlan| info.symbols[d.symbol as usize].data().is_some_and(|def| def.segment == Some(segment));
        let own = |d: &DataPlan| info.symbols[d.symbol as usize].data().expect("data symbol").address;
        let d = self
            .data
            .iter()
            .filter(in_segment)
            .find(|d| addr >= own(d) && addr - own(d) < d.size.max(1))
            .or_else(|| self.data.iter().filter(in_segment).find(|d| own(d) + d.size == addr))?;
        Some(self.base_of(d, fresh_base) + (addr - own(d)))
    }

    /// Where the object of `d` starts once placed.
    fn base_of(&self, d: &DataPlan, fresh_base: u32) -> u32 {
        match &d.fate {
            DataFate::Kept { address } => *address,
            DataFate::Added { fresh } | DataFate::Converted { fresh, .. } => fresh_base + fresh,
        }
    }

    /// How far the objects of a section the program walks from `__start_`
    /// to `__stop_` move; they must all move alike, or the walk would step
    /// into memory that is not theirs.
    fn segment_shift(&self, segment: u32, fresh_base: u32) -> Result<i32, Error> {
        let info = &self.new.info;
        let mut shifts = self.data.iter().filter_map(|d| {
            let def = info.symbols[d.symbol as usize].data()?;
            (def.segment == Some(segment)).then(|| self.base_of(d, fresh_base).wrapping_sub(def.address) as i32)
        });
        let first = shifts.next().unwrap_or(0);
        match shifts.all(|s| s == first) {
            true => Ok(first),
            false => Err(Error::SplitSection(info.segments[segment as usize].name.clone())),
        }
    }

    /// Counts for the report: (kept, converted automatically, converted by
    /// a C transformer, added, removed).
    pub fn data_counts(&self) -> (usize, usize, usize, usize, usize) {
        let mut counts = (0, 0, 0, 0, self.removed.len());
        for d in &self.data {
            match &d.fate {
                DataFate::Kept { .. } => counts.0 += 1,
                DataFate::Converted { transformer: None, .. } => counts.1 += 1,
                DataFate::Converted { transformer: Some(_), .. } => counts.2 += 1,
                DataFate::Added { .. } => counts.3 += 1,
            }
        }
        counts
    }
}

/// Writable data symbols that are not inside a larger one (members follow
/// their container), by symbol index, each with its aliases: the other
/// symbols covering exactly the same bytes.
fn writable_roots(version: &Version) -> Vec<(u32, Vec<u32>)> {
    let info = &version.info;
    let mut symbols: Vec<(u32, u32, u32)> = info
        .symbols
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_absolute())
        .filter_map(|(i, s)| s.data().map(|d| (i as u32, d)))
        .filter(|(_, d)| d.segment.is_some_and(|seg| info.segments.get(seg as usize).is_some_and(|s| s.writable)))
        .filter(|(i, _)| version.data_keys.contains_key(i))
        .map(|(i, d)| (i, d.address, d.size))
        .collect();
    symbols.sort_by_key(|&(i, address, size)| (address, std::cmp::Reverse(size), i));
    let mut roots: Vec<(u32, Vec<u32>)> = Vec::new();
    let mut last = (0u32, 0u32);
    let mut covered_to = 0u32;
    for (i, address, size) in symbols {
        if !roots.is_empty() && (address, size) == last {
            roots.last_mut().expect("not empty").1.push(i);
            continue;
        }
        if address < covered_to || (size == 0 && address == covered_to && !roots.is_empty()) {
            continue;
        }
        roots.push((i, Vec::new()));
        last = (address, size);
        covered_to = address + size;
    }
    roots
}

/// The segment whose bounds a `__start_NAME` or `__stop_NAME` symbol gives,
/// for a section NAME of the module.
fn section_bound(info: &crate::module::ModuleInfo, name: Option<&str>) -> Option<u32> {
    let name = name?;
    let section = name.strip_prefix("__start_").or_else(|| name.strip_prefix("__stop_"))?;
    info.segments.iter().position(|s| s.name == section).map(|i| i as u32)
}

/// `Ok(None)`: same type; `Ok(Some(map))`: changed, mapped; `Err`: refused.
fn compare_types(
    old: &Version,
    old_address: u32,
    old_size: u32,
    new: &Version,
    new_address: u32,
    new_size: u32,
    key: &SymbolKey,
) -> Result<Option<ValueMap>, String> {
    let old_var = old.debug.global_at(old_address).filter(|g| g.address == old_address);
    let new_var = new.debug.global_at(new_address).filter(|g| g.address == new_address);
    match (old_var, new_var) {
        (Some(a), Some(b)) => {
            if same_type(&old.debug, a.ty, &new.debug, b.ty) {
                return Ok(None);
            }
            value_map_through_pointers(&old.debug, a.ty, &new.debug, b.ty, &key.name)
                .map(Some)
                .map_err(|e| format!("global `{key}` changed type and cannot be mapped: {e}"))
        }
        _ if old_size == new_size => Ok(None),
        _ => Err(format!(
            "global `{key}` changed size from {old_size} to {new_size} bytes and has no debug info to map it by (build both versions with bin/upstare-cc, which compiles with -g)"
        )),
    }
}

/// The optimizer may split a `static` struct whose address never escapes
/// into one symbol per field (`stats.0`, `stats.1`, ...), numbered by field
/// position and without DWARF of their own. Matching those pieces by name
/// is only sound while the set of pieces stays the same: a field inserted
/// in the middle would shift every number after it.
fn refuse_changed_splits(old: &Version, new: &Version, refusals: &mut Vec<String>) {
    let pieces = |v: &Version| {
        // (base name, unit) -> the pieces' (name, size)
        type Groups = BTreeMap<(String, Option<String>), Vec<(String, u32)>>;
        let mut groups = Groups::new();
        for (i, key) in &v.data_keys {
            let Some((base, suffix)) = key.name.rsplit_once('.') else { continue };
            if base.is_empty() || base.starts_with(".L") || !suffix.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let size = v.info.symbols[*i as usize].data().map_or(0, |d| d.size);
            groups.entry((base.to_string(), key.unit.clone())).or_default().push((key.name.clone(), size));
        }
        for g in groups.values_mut() {
            g.sort();
        }
        groups
    };
    let (before, after) = (pieces(old), pieces(new));
    // GlobalOpt also turns a static pointer that is assigned once, from
    // `malloc`, into static storage (`store.body.0`, ...): the same state is
    // then a pointer to the heap in one version and globals in the other.
    let named = |v: &Version, name: &str| v.data_keys.values().any(|k| k.name == name);
    for (pieces, other, was, is) in [(&before, new, "running", "new"), (&after, old, "new", "running")] {
        for (group, _) in pieces {
            let Some(pointer) = group.0.strip_suffix(".body") else { continue };
            if named(other, pointer) {
                refusals.push(format!(
                    "the optimizer turned the heap object `{pointer}` points to into static storage (`{}.N`) in the {was} version but not in the {is} one: the two cannot be matched (give `{pointer}` external linkage so that it stays a pointer)",
                    group.0
                ));
            }
        }
    }
    for (group, old_pieces) in &before {
        if let Some(new_pieces) = after.get(group).filter(|p| *p != old_pieces) {
            refusals.push(format!(
                "global `{}` was split by the optimizer into one symbol per field, and its fields changed ({} pieces before, {} after): they cannot be matched safely (keep it whole, e.g. by giving it external linkage, so its type can be mapped through DWARF)",
                group.0,
                old_pieces.len(),
                new_pieces.len()
            ));
        }
    }
}

fn identity_map(size: u32) -> ValueMap {
    ValueMap {
        copies: vec![crate::dwarf::ByteCopy { from: 0, to: 0, len: u64::from(size) }],
        ..ValueMap::default()
    }
}

/// Functions in the old table keep their slots; new ones take slots above
/// the old table.
/// Thread-local variables as (name, offset in the thread's block, size),
/// in offset order.
fn thread_locals(version: &Version) -> Vec<(String, u32, u32)> {
    let mut vars: Vec<(String, u32, u32)> = version
        .info
        .symbols
        .iter()
        .filter(|s| s.is_thread_local() && s.is_defined())
        .filter_map(|s| s.data().map(|d| (s.name.clone().unwrap_or_default(), d.offset, d.size)))
        .collect();
    vars.sort_by_key(|(name, offset, _)| (*offset, name.clone()));
    vars
}

/// Every thread of a running program keeps its own copy of each
/// thread-local variable, in a block laid out by the old version; nothing
/// converts those blocks, so the new version must lay them out the same.
fn refuse_changed_thread_locals(old: &Version, new: &Version, refusals: &mut Vec<String>) {
    let (before, after) = (thread_locals(old), thread_locals(new));
    if before == after {
        return;
    }
    let differs = before
        .iter()
        .zip(&after)
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("`{}` at offset {} ({} bytes) became `{}` at offset {} ({} bytes)", a.0, a.1, a.2, b.0, b.1, b.2))
        .unwrap_or_else(|| format!("{} variables became {}", before.len(), after.len()));
    refusals.push(format!(
        "the thread-local variables changed layout ({differs}): every thread keeps its own copy laid out by the old version, which an update does not convert"
    ));
}

fn plan_table(old: &Version, new: &Version, refusals: &mut Vec<String>) -> BTreeMap<u32, u32> {
    let old_slot_of_key: HashMap<&SymbolKey, u32> =
        old.layout.table.iter().map(|(slot, f)| (&old.function_keys[*f as usize], *slot)).collect();
    let mut next = old.layout.table.keys().next_back().map_or(1, |s| s + 1);
    let mut table = BTreeMap::new();
    let new_slots = new.info.table.as_ref().map(|t| t.slots.clone()).unwrap_or_default();
    for (_, func) in new_slots {
        let key = &new.function_keys[func as usize];
        let slot = match old_slot_of_key.get(key) {
            Some(&s) => s,
            None => {
                next += 1;
                next - 1
            }
        };
        if table.insert(slot, func).is_some() {
            refusals.push(format!("two functions of the new version claim table slot {slot} (`{key}`)"));
        }
    }
    table
}

/// Mutable wasm globals (`__stack_pointer` among them) present in both
/// versions by name and type: their running values carry over.
fn carried_globals(old: &Version, new: &Version) -> Vec<(u32, u32)> {
    let old_by_name: HashMap<&str, (u32, &crate::module::Global)> = old
        .info
        .globals
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.name.as_deref().map(|n| (n, (i as u32, g))))
        .collect();
    new.info
        .globals
        .iter()
        .enumerate()
        .filter(|(_, g)| g.mutable)
        .filter_map(|(i, g)| {
            let (old_index, old_global) = old_by_name.get(g.name.as_deref()?)?;
            (old_global.mutable && old_global.ty == g.ty).then_some((i as u32, *old_index))
        })
        .collect()
}

fn absolute_symbols(version: &Version) -> HashMap<String, u32> {
    version
        .info
        .symbols
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_absolute())
        .filter_map(|(i, s)| {
            let address = version.layout.data.get(&(i as u32)).copied().or(s.data().map(|d| d.address))?;
            Some((s.name.clone()?, address))
        })
        .collect()
}

/// The exports the host calls during an update: transformers and
/// converters.
fn user_code_exports(wasm: &[u8]) -> Vec<TransformerExport> {
    let mut exports = exports_named(wasm, TRANSFORMER_PREFIX);
    exports.extend(exports_named(wasm, CONVERTER_PREFIX));
    exports
}

/// wasm-ld exports a function of a command module through a wrapper
/// (`<name>.command_export`) that runs the program's constructors before
/// it and its destructors (atexit handlers, stdio flushing) after it: right
/// for a fresh call into a program, wrong in the middle of one. Transformer
/// and converter exports are pointed at the function itself.
fn transformer_targets(info: &crate::module::ModuleInfo, exports: &[TransformerExport]) -> HashMap<String, u32> {
    exports
        .iter()
        .filter(|e| e.kind == wasmparser::ExternalKind::Func)
        .filter_map(|e| {
            let wrapper = info.function_name(e.index);
            let inner = wrapper.strip_suffix(".command_export")?;
            let target = (0..info.functions.len() as u32).find(|&f| info.functions[f as usize].name.as_deref() == Some(inner))?;
            Some((e.name.clone(), target))
        })
        .collect()
}

/// An export named with [`TRANSFORMER_PREFIX`] or [`CONVERTER_PREFIX`].
pub(crate) struct TransformerExport {
    pub(crate) name: String,
    kind: wasmparser::ExternalKind,
    index: u32,
}

/// The module's exports whose names start with `prefix`: its C transformers
/// or converters.
pub(crate) fn exports_named(wasm: &[u8], prefix: &str) -> Vec<TransformerExport> {
    let mut out = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let Ok(wasmparser::Payload::ExportSection(exports)) = payload {
            for export in exports.into_iter().flatten() {
                if export.name.starts_with(prefix) {
                    out.push(TransformerExport { name: export.name.to_string(), kind: export.kind, index: export.index });
                }
            }
        }
    }
    out
}
