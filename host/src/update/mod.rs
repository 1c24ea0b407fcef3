//! Live update: replacing the running version of a guest with its next one,
//! as a transaction.
//!
//! [`prepare`] does everything that can happen while the program runs: plan
//! the update with patchgen, reserve fresh memory, relink, instrument and
//! compile the new module. [`Guest::apply_update`] runs while the guest is
//! paused:
//!
//! 1. map every saved frame to the new code (a frame that cannot be mapped
//!    yet ends the attempt with nothing changed: the caller resumes the old
//!    version and may try again once that frame has left the stack);
//! 2. instantiate the new module in a fresh store over the same memories,
//!    with the process's WASI state moved over;
//! 3. write the new version's fresh data, convert changed globals, carry the
//!    wasm globals, run the constructors only the new version has, then the
//!    C transformers;
//! 4. rewind the mapped frames into the new code with a pause already
//!    requested, so the guest unwinds again at the resume point before any
//!    of its code has run, and compare the frames it saves with the frames
//!    it was given: proof that the new code accepts them;
//! 5. commit (drop the old store) or, on any failure, roll back: the old
//!    store, instance, frames and WASI state come back as they were.
//!
//! State of the old version is only read, never written, before the commit:
//! kept globals stay in place, and everything the new version adds lives in
//! fresh memory, so a rollback has nothing to undo in memory (except what a
//! C transformer wrote: memory is backed up before the transformers run and
//! restored on any failure after). Fresh memory comes from
//! [`crate::fresh`], which reuses the areas of versions no longer running
//! and takes back the area of an update that did not happen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use upstare_instrument::abi::{exports, relinked, write_frames, TypedFrame, Value};
use upstare_instrument::Metadata;
use upstare_patchgen::frames::{FrameMapper, FramePlan, MappedStack};
use upstare_patchgen::heap;
use upstare_patchgen::paused::{Findings, PausedProgram, PausedThread};
use upstare_patchgen::plan::{plan, Linked, Plan};
use upstare_patchgen::version::Version;
use wasmtime::{Engine, InstancePre, Store};

use crate::module::{one_line, GuestModule};
use crate::pause::ControlMemory;
use crate::process::{classify, link_memories, AfterReturn, ProcessState, Unwinder};
use crate::fresh::{unreferenced, Area, FreshAreas};
use crate::heap_conversion;
pub use crate::heap_conversion::{Calls, HeapCounts, HeapError};
use crate::processes::Processes;
use crate::program_memory::ProgramMemory;
use crate::wasi::{UnwindHooks, WasiCtx};
use crate::Guest;

mod error;
mod processes;
mod threads;

pub use error::{ApplyError, UpdateError};

/// A version of the program the host can run: what patchgen knows of it,
/// and its compiled, instrumented module.
#[derive(Clone)]
pub struct RunningVersion {
    /// Patchgen's view: the module as built and its layout.
    pub version: Arc<Version>,
    /// The module that runs (relinked, instrumented, compiled).
    pub module: GuestModule,
    /// Where the user's module came from, for reports.
    pub path: PathBuf,
    /// SHA-256 of the user's module, hex.
    pub hash: String,
}

impl std::fmt::Debug for RunningVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVersion").field("path", &self.path).finish_non_exhaustive()
    }
}

impl RunningVersion {
    /// The first version of a program: its module runs at the addresses it
    /// was linked for.
    pub fn initial(module: &GuestModule) -> Result<Self, UpdateError> {
        if relinked::is_marked(module.original_bytes()) {
            return Err(UpdateError::Refused(
                "this program was restored from a snapshot taken after a live update; its layout is not recorded in the snapshot, so it cannot be updated again (restart it from its module, or update it before checkpointing)".into(),
            ));
        }
        let version = Version::initial(Arc::new(module.original_bytes().to_vec())).map_err(|e| {
            UpdateError::BadInput(format!("the running program cannot be updated: {} ({e})", module.path().display()))
        })?;
        Ok(RunningVersion {
            version: Arc::new(version),
            module: module.clone(),
            path: module.path().to_path_buf(),
            hash: module.hash_hex(),
        })
    }
}

/// An update planned, placed and compiled, ready to apply at a pause.
pub struct Prepared {
    /// The plan.
    pub plan: Plan,
    /// The plan placed in fresh memory, and the relinked module.
    pub linked: Linked,
    /// The new version, once committed.
    pub next: RunningVersion,
    /// How each frame moves, decided for every resume point.
    pub frames: FramePlan,
    /// The new module, linked against the running memories, ready to
    /// instantiate.
    pub instance_pre: InstancePre<ProcessState>,
    /// How long preparing took.
    pub prepare_time: Duration,
    /// The fresh area reserved for the new version, if it needs one.
    pub fresh: Option<Area>,
    /// Fresh areas the new version no longer uses: freed at the commit if
    /// nothing points into them.
    pub retiring: Vec<Area>,
    /// The program's other processes when the update was prepared, by pid:
    /// the fresh area lies above their memories as they were then, and
    /// none of them may have grown into it since.
    pub processes_at_prepare: Vec<u32>,
}

/// What an update did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The new version's module path.
    pub path: PathBuf,
    /// Its hash.
    pub hash: String,
    /// Functions changed, added, removed, unchanged.
    pub functions: (usize, usize, usize, usize),
    /// Globals kept, moved (converted automatically), transformed (by C),
    /// added, removed.
    pub globals: (usize, usize, usize, usize, usize),
    /// Frames moved to the new code (the main thread's).
    pub frames: usize,
    /// Threads moved to the new code, the main one included.
    pub threads: usize,
    /// Processes moved to the new code, the first included.
    pub processes: usize,
    /// Frames that went back to their loop header, and frames above them
    /// dropped (their blocking calls start again in the new version).
    pub retreated: (usize, usize),
    /// Frames rebuilt where they stand because their area in linear memory
    /// changed (the frames above them shifted).
    pub rebuilt: usize,
    /// From the guest stopped (unwound) to the new version ready to run.
    pub pause: Duration,
    /// When the guest stopped (the whole program paused).
    pub paused_at: Instant,
    /// From the pause request to the program paused, when the caller
    /// knows when it asked (the supervisor does).
    pub request_to_paused: Option<Duration>,
    /// Planning, relinking, instrumenting and compiling, before the pause.
    pub prepare: Duration,
    /// Retired fresh areas found unreferenced at the commit: free for reuse.
    pub freed: Vec<Area>,
    /// Heap objects of changed types converted, and pointers rewritten.
    pub heap: HeapCounts,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (c, a, r, u) = self.functions;
        let (kept, moved, transformed, added, removed) = self.globals;
        writeln!(f, "updated to {} (sha256:{})", self.path.display(), self.hash)?;
        writeln!(f, "functions: {c} changed, {a} added, {r} removed, {u} unchanged")?;
        writeln!(f, "globals: {kept} kept, {moved} moved, {transformed} transformed, {added} added, {removed} removed")?;
        let (retreated, dropped) = self.retreated;
        writeln!(f, "frames: {} mapped, {retreated} retreated, {dropped} dropped, {} rebuilt", self.frames, self.rebuilt)?;
        if self.threads > 1 {
            writeln!(f, "threads: {} moved to the new version together", self.threads)?;
        }
        if self.processes > 1 {
            writeln!(f, "processes: {} moved to the new version together", self.processes)?;
        }
        let HeapCounts { converted, rewritten } = self.heap;
        writeln!(f, "heap: {converted} objects converted, {rewritten} pointers rewritten")?;
        if let Some(d) = self.request_to_paused {
            writeln!(f, "request to paused: {} us", d.as_micros())?;
        }
        writeln!(f, "pause: {} us", self.pause.as_micros())?;
        write!(f, "prepare: {} ms", self.prepare.as_millis())
    }
}

/// Plans the update of `current` to the module `bytes` and gets it ready:
/// fresh memory reserved in `memory` from `fresh` (above the memories of
/// the program's other `processes`, if it forks), module relinked,
/// instrumented and compiled. The program keeps running meanwhile. An
/// update that is not applied must hand its area back
/// ([`FreshAreas::release`]); on error here that is already done.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    engine: &Engine,
    current: &RunningVersion,
    memory: &ProgramMemory,
    fresh: &mut FreshAreas,
    control: &ControlMemory,
    processes: Option<&Processes>,
    path: &Path,
    bytes: Vec<u8>,
) -> Result<Prepared, UpdateError> {
    let started = Instant::now();
    let hash = crate::cache::hex(&crate::cache::content_hash(&bytes));
    let bad = |e: String| UpdateError::BadInput(format!("{}: {e}", path.display()));
    // Everything the loader checks (wasm at all, valid) first, for its
    // clear messages.
    GuestModule::check_bytes(path, &bytes).map_err(|e| UpdateError::BadInput(e.to_string()))?;
    let plan = plan(current.version.clone(), Arc::new(bytes)).map_err(|e| bad(e.to_string()))?;
    tracing::debug!("update: planned in {:?}", started.elapsed());
    if !plan.is_safe() {
        return Err(UpdateError::Refused(plan.refusals.join("; ")));
    }
    let others = processes.map(Processes::children_now).unwrap_or_default();
    let floor = processes.map_or(0, Processes::largest_child_memory);
    let area = match plan.fresh_size {
        0 => None,
        size => Some(fresh.reserve(memory, size, floor).map_err(UpdateError::Refused)?),
    };
    let placed = place(engine, current, memory, control, path, plan, area, hash, started);
    if let (Err(_), Some(area)) = (&placed, area) {
        fresh.release(area);
    }
    let mut prepared = placed?;
    prepared.retiring = fresh.retiring(&prepared.next.version, area);
    prepared.processes_at_prepare = others;
    Ok(prepared)
}

/// The rest of [`prepare`], once the fresh area is reserved.
#[allow(clippy::too_many_arguments)]
fn place(
    engine: &Engine,
    current: &RunningVersion,
    memory: &ProgramMemory,
    control: &ControlMemory,
    path: &Path,
    plan: Plan,
    area: Option<Area>,
    hash: String,
    started: Instant,
) -> Result<Prepared, UpdateError> {
    let base = area.map_or(0, |a| a.base);
    // The plan's verdict already covers the relink: a failure here is ours.
    let mut linked =
        plan.link(base).map_err(|e| UpdateError::Internal(format!("the plan's trial relink passed, but relinking at {base:#x} failed: {e}")))?;
    relinked::mark(&mut linked.wasm);
    tracing::debug!("update: relinked at {:?}", started.elapsed());
    // The full variant at once, since the update rewinds into it; the
    // stress one under --stress-update, whose next version must count loop
    // headers too.
    let options = crate::LoadOptions { stress: current.module.stress, lazy_rewind: false, ..crate::LoadOptions::default() };
    let module = GuestModule::from_bytes_with(engine, path, &linked.wasm, &options).map_err(|e| UpdateError::BadInput(e.to_string()))?;
    tracing::debug!("update: instrumented and compiled at {:?}", started.elapsed());
    let next = RunningVersion { version: Arc::new(linked.version.clone()), module, path: path.to_path_buf(), hash };
    let (old_meta, new_meta) = match (current.module.metadata(), next.module.metadata()) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(UpdateError::Refused("both versions must be instrumented".into())),
    };
    let frames = FrameMapper {
        old: (&current.version, old_meta),
        new: (&next.version, new_meta),
        functions: &plan.functions,
        identical_code_rule: true,
    }
    .plan();
    tracing::debug!("update: frame recipes at {:?}", started.elapsed());
    let instance_pre = link(engine, &next.module, memory, control)
        .map_err(|e| UpdateError::BadInput(format!("{}: cannot link the new version: {}", path.display(), one_line(&e))))?;
    Ok(Prepared {
        plan,
        linked,
        next,
        frames,
        instance_pre,
        prepare_time: started.elapsed(),
        fresh: area,
        retiring: Vec::new(),
        processes_at_prepare: Vec::new(),
    })
}

/// Gets the update of `current` to its own module ready, with every
/// function treated as changed and frames moved only by what their values
/// mean ([`upstare_patchgen::plan::onto_itself`]): the diagnostic
/// `--stress-update`. Nothing is relinked or compiled again; the running
/// module is linked against the running memories once, and the result may
/// be applied any number of times.
pub fn prepare_onto_itself(
    engine: &Engine,
    current: &RunningVersion,
    memory: &ProgramMemory,
    control: &ControlMemory,
) -> Result<Prepared, UpdateError> {
    let started = Instant::now();
    let internal = |e: String| UpdateError::Internal(format!("cannot plan the update onto the running module: {e}"));
    let (plan, linked) = upstare_patchgen::plan::onto_itself(current.version.clone()).map_err(|e| internal(e.to_string()))?;
    let meta = current.module.metadata().ok_or(UpdateError::NotInstrumented)?;
    let frames = FrameMapper {
        old: (&current.version, meta),
        new: (&current.version, meta),
        functions: &plan.functions,
        identical_code_rule: false,
    }
    .plan();
    let instance_pre = link(engine, &current.module, memory, control).map_err(|e| internal(one_line(&e)))?;
    Ok(Prepared {
        plan,
        linked,
        next: current.clone(),
        frames,
        instance_pre,
        prepare_time: started.elapsed(),
        fresh: None,
        retiring: Vec::new(),
        processes_at_prepare: Vec::new(),
    })
}

/// Links the new module against the WASI layer and the running memories,
/// so that instantiating it at the pause costs only the instantiation.
pub(crate) fn link(
    engine: &Engine,
    module: &GuestModule,
    memory: &ProgramMemory,
    control: &ControlMemory,
) -> wasmtime::Result<InstancePre<ProcessState>> {
    let mut linker = crate::process::host_linker(engine, module.spawns_threads())?;
    // `define` wants a store only to check types; the memories belong to
    // the engine, so the linked module is not tied to this one.
    let mut scratch = Store::new(engine, ProcessState { wasi: WasiCtx::detached()?, hooks: None, threads: None });
    link_memories(&mut scratch, &mut linker, memory, control)?;
    linker.instantiate_pre(module.module())
}

/// The old instance, kept aside until the update commits.
pub(crate) struct Previous {
    module: GuestModule,
    store: Store<ProcessState>,
    instance: wasmtime::Instance,
    unwinder: Unwinder,
    frame_bytes: Vec<u8>,
}

/// What an update copies before it writes memory the old version owns.
enum Backup<'a> {
    /// All of it: C transformers and constructors may write anywhere.
    Whole(Vec<u8>),
    /// What converting the heap writes.
    Heap(heap_conversion::Undo<'a>),
}

impl Backup<'_> {
    /// Writes the copy back; false if memory shrank under it (it cannot).
    fn restore(&self, memory: &ProgramMemory) -> bool {
        match self {
            Backup::Whole(bytes) => memory.write(0, bytes),
            Backup::Heap(undo) => undo.restore(memory),
        }
    }
}

/// A paused thread's frame variables moved and stack addresses rewritten
/// for its mapped stack (a frame gone back to its loop header, a frame
/// rebuilt where it stands), with what they overwrote, to put back.
pub(crate) struct FrameUndo {
    /// What each move's destination held, in the order of `stack.moves`.
    overwritten: Vec<(u32, Vec<u8>)>,
    /// What each rewritten address held.
    patched: Vec<(u32, Vec<u8>)>,
}

impl FrameUndo {
    /// Moves the variables of `stack`, then writes its rewritten addresses
    /// over the moved bytes; on failure nothing stays written.
    pub(crate) fn apply(stack: &MappedStack, memory: &ProgramMemory) -> Result<Self, ApplyError> {
        let sources: Vec<Vec<u8>> = stack
            .moves
            .iter()
            .map(|(from, _, len)| memory.read(u64::from(*from), *len).ok_or(ApplyError::MovingVariableOutOfBounds))
            .collect::<Result<_, _>>()?;
        let overwritten: Vec<(u32, Vec<u8>)> = stack
            .moves
            .iter()
            .map(|(_, to, len)| memory.read(u64::from(*to), *len).map(|b| (*to, b)).ok_or(ApplyError::NewPlaceOutOfBounds))
            .collect::<Result<_, _>>()?;
        // Then the rewritten addresses, over the moved bytes: what they
        // overwrite is read after the moves, to be put back before them.
        for ((_, to, _), bytes) in stack.moves.iter().zip(&sources) {
            memory.write(u64::from(*to), bytes);
        }
        let mut undo = FrameUndo { overwritten, patched: Vec::with_capacity(stack.patches.len()) };
        for (at, value) in &stack.patches {
            let Some(before) = memory.read(u64::from(*at), 4) else {
                undo.restore(memory);
                return Err(ApplyError::RewrittenAddressOutOfBounds);
            };
            memory.write(u64::from(*at), &value.to_le_bytes());
            undo.patched.push((*at, before));
        }
        Ok(undo)
    }

    /// Puts back what [`FrameUndo::apply`] overwrote, last write first.
    pub(crate) fn restore(&self, memory: &ProgramMemory) {
        for (at, before) in self.patched.iter().rev() {
            memory.write(u64::from(*at), before);
        }
        for (to, bytes) in self.overwritten.iter().rev() {
            memory.write(u64::from(*to), bytes);
        }
    }
}

/// The heap's part of an update, decided while paused.
struct HeapStep {
    /// What to convert and rewrite in memory.
    plan: heap::Plan,
    /// Frame locals to rewrite, as (mapped frame, local).
    frame_pointers: Vec<(usize, usize)>,
    /// The same for each of the other threads, in the order of
    /// [`ProcessPlan::workers`].
    thread_frame_pointers: Vec<Vec<(usize, usize)>>,
}

/// One process's part of an update, decided while the program is paused:
/// its threads' frames mapped to the new version and its heap's
/// conversion.
pub(super) struct ProcessPlan {
    /// The main thread's frames as it paused, innermost first.
    frames: Vec<TypedFrame>,
    /// The main thread's frames mapped.
    stack: MappedStack,
    /// The other threads, their frames mapped.
    workers: Vec<threads::ThreadStep>,
    heap: Option<HeapStep>,
}

impl Guest {
    /// Applies a prepared update to this paused guest (see the module
    /// docs), and to every other thread and process of its program;
    /// `paused_at` is when it stopped, for the report's pause time. On
    /// success the program is paused in the new version; on failure it is
    /// paused in the old one, exactly as before.
    pub fn apply_update(
        &mut self,
        current: &RunningVersion,
        prepared: &Prepared,
        paused_at: Instant,
    ) -> Result<Report, UpdateError> {
        let new_meta: Arc<Metadata> = prepared
            .next
            .module
            .metadata
            .clone()
            .ok_or_else(|| UpdateError::Refused("the new module is not instrumented".into()))?;
        let plan = self.plan_update(current, prepared, &new_meta)?;
        // The program's other processes, paused with it, move with it.
        let others = match self.first_process_of() {
            Some(program) => processes::plan(&program, current, prepared, &new_meta)?,
            None => Vec::new(),
        };
        let heap = self
            .apply_plan(prepared, &prepared.instance_pre, &plan, &new_meta, |_| processes::apply(&others, prepared, &new_meta))
            .map_err(UpdateError::RolledBack)?;
        let sp = self.stack_pointer(&prepared.next.version);
        let memory = &instrumented(&mut self.unwinder).map_err(|_| UpdateError::NotInstrumented)?.memory;
        let mapped = &plan.stack.frames;
        let freed = processes::unreferenced(&others, unreferenced(&prepared.retiring, mapped, &prepared.next.version, memory, sp), prepared);
        let p = &prepared.plan;
        Ok(Report {
            path: prepared.next.path.clone(),
            hash: prepared.next.hash.clone(),
            functions: (p.functions.changed.len(), p.functions.added.len(), p.functions.removed.len(), p.functions.unchanged.len()),
            globals: p.data_counts(),
            frames: mapped.len(),
            threads: 1 + plan.workers.len(),
            processes: 1 + others.len(),
            retreated: match plan.stack.retreated {
                Some(_) => (1, plan.frames.len() - mapped.len()),
                None => (0, 0),
            },
            rebuilt: usize::from(plan.stack.rebuilt.is_some()),
            pause: paused_at.elapsed(),
            paused_at,
            request_to_paused: None,
            prepare: prepared.prepare_time,
            freed,
            heap,
        })
    }

    /// Decides, while paused, how this process moves to the new version:
    /// its threads' frames mapped, and patchgen's checks of what it holds
    /// ([`PausedProgram::check`]). Changes nothing.
    pub(super) fn plan_update(&mut self, current: &RunningVersion, prepared: &Prepared, new_meta: &Arc<Metadata>) -> Result<ProcessPlan, UpdateError> {
        let u = self.unwinder.as_ref().ok_or(UpdateError::NotInstrumented)?;
        let frames = u.paused.clone().ok_or_else(|| UpdateError::Refused("the guest is not paused".into()))?;
        if self.module.hash != current.module.hash {
            return Err(UpdateError::Refused("the update was prepared for another version than the one running".into()));
        }
        let sp = self.stack_pointer(&current.version);
        let memory = &instrumented(&mut self.unwinder).map_err(|_| UpdateError::NotInstrumented)?.memory;
        let stack = prepared.frames.map_paused(&frames, sp, memory).map_err(UpdateError::Frame)?;
        // The process's other threads, paused with it, move with it.
        let workers = match &self.threads {
            Some(threads) => threads::plan(threads, &current.version, prepared, memory)?,
            None => Vec::new(),
        };
        // SAFETY: the process is paused, with its threads; nothing runs or
        // grows its memory until this plan is made, and nothing else
        // touches it meanwhile.
        let view = unsafe { memory.bytes() };
        let paused = PausedProgram {
            version: &current.version,
            memory: &view,
            main: PausedThread { tid: None, frames: &frames, stack_pointer: sp, stack_top: None, mapped: &stack },
            workers: workers.iter().map(threads::ThreadStep::paused).collect(),
        };
        let started = Instant::now();
        let Findings { heap, frame_pointers, thread_frame_pointers } =
            paused.check(&prepared.plan, &prepared.linked, self.module.metadata(), &prepared.next.version, new_meta).map_err(UpdateError::Stale)?;
        if let Some(t) = &heap {
            tracing::debug!(
                "update: heap traced in {:?}: {} allocations in {} segments, {} pointers followed, {} objects to convert",
                started.elapsed(),
                t.chunks.0,
                t.chunks.1,
                t.pointers_traced,
                t.objects.len()
            );
        }
        let heap = heap.map(|plan| HeapStep { plan, frame_pointers, thread_frame_pointers });
        Ok(ProcessPlan { frames, stack, workers, heap })
    }

    /// Moves this process to the new version as `plan` says, linked by
    /// `instance_pre`, then its other threads, then runs `and_then` (the
    /// program's other processes). If any of it fails, everything it moved
    /// is put back as it was.
    pub(super) fn apply_plan(
        &mut self,
        prepared: &Prepared,
        instance_pre: &InstancePre<ProcessState>,
        plan: &ProcessPlan,
        new_meta: &Arc<Metadata>,
        and_then: impl FnOnce(&mut Guest) -> Result<(), ApplyError>,
    ) -> Result<HeapCounts, ApplyError> {
        let mut previous = self.switch_to(&prepared.next.module, instance_pre, new_meta.clone())?;
        let mut moved_workers = None;
        let then = |g: &mut Guest, new_starts: &[u32]| {
            let heap = plan.heap.as_ref().map(|h| threads::HeapRewrites { plan: &h.plan, new_starts, locals: &h.thread_frame_pointers });
            let (moved, rewritten) = threads::apply(&plan.workers, prepared, new_meta, heap)?;
            if let Err(reason) = and_then(g) {
                threads::undo(moved);
                return Err(reason);
            }
            moved_workers = Some(moved);
            Ok(rewritten)
        };
        match self.finish_update(&mut previous, prepared, &plan.stack, plan.heap.as_ref(), then) {
            Ok(heap) => {
                // Every thread accepted the new code: the old instances go.
                drop(previous);
                drop(moved_workers);
                Ok(heap)
            }
            Err(reason) => {
                self.switch_back(previous);
                Err(reason)
            }
        }
    }

    /// The running value of `__stack_pointer`, the shadow stack's top of use.
    pub(crate) fn stack_pointer(&mut self, version: &Version) -> Option<u32> {
        let index = stack_pointer_index(version)?;
        let global = self.instance.get_global(&mut self.store, &exports::global(index))?;
        global.get(&mut self.store).i32().map(|v| v as u32)
    }

    /// Instantiates `module` in a fresh store over this guest's memories and
    /// makes it the guest's instance, moving the WASI state over. Returns
    /// the old instance.
    pub(crate) fn switch_to(&mut self, module: &GuestModule, instance_pre: &InstancePre<ProcessState>, metadata: Arc<Metadata>) -> Result<Previous, ApplyError> {
        let u = instrumented(&mut self.unwinder)?;
        let (memory, control, unwinds, stress_stops) = (u.memory.clone(), u.control.clone(), u.unwinds, u.stress_stops);
        let frame_bytes = control.frame_bytes();
        let engine = self.store.engine().clone();
        let stand_in = self.store.data().wasi.stand_in();
        let wasi = std::mem::replace(&mut self.store.data_mut().wasi, stand_in);
        let mut store = Store::new(&engine, ProcessState { wasi, hooks: None, threads: self.threads.clone() });
        let built = instance_pre.instantiate(&mut store).and_then(|instance| {
            let unwinder = Unwinder::new(&mut store, &instance, memory, control, metadata, !module.is_unwind_only())?;
            store.data_mut().hooks = Some(UnwindHooks { state: unwinder.state.clone() });
            Ok((instance, unwinder))
        });
        let (instance, mut unwinder) = match built {
            Ok(v) => v,
            Err(e) => {
                // The open files go back where they were.
                std::mem::swap(&mut store.data_mut().wasi, &mut self.store.data_mut().wasi);
                return Err(ApplyError::Instantiate(e));
            }
        };
        unwinder.unwinds = unwinds;
        unwinder.stress_stops = stress_stops;
        // Found at the top, so this cannot fail and leave the files behind.
        let old_unwinder = std::mem::replace(instrumented(&mut self.unwinder)?, unwinder);
        let old_store = std::mem::replace(&mut self.store, store);
        let old_module = std::mem::replace(&mut self.module, module.clone());
        let old_instance = std::mem::replace(&mut self.instance, instance);
        self.source_map = module.source_map.clone();
        if let Some(threads) = &self.threads {
            threads.set_module(&self.module);
        }
        Ok(Previous { module: old_module, store: old_store, instance: old_instance, unwinder: old_unwinder, frame_bytes })
    }

    /// Puts the old instance back, with its WASI state and frames.
    pub(crate) fn switch_back(&mut self, previous: Previous) {
        let Previous { module, mut store, instance, unwinder, frame_bytes } = previous;
        std::mem::swap(&mut store.data_mut().wasi, &mut self.store.data_mut().wasi);
        self.store = store;
        self.instance = instance;
        self.source_map = module.source_map.clone();
        if let Some(threads) = &self.threads {
            threads.set_module(&module);
        }
        self.module = module;
        // The frames were read before the switch; writing them back cannot
        // need more memory than they had.
        let _ = unwinder.control.set_frames(&frame_bytes);
        unwinder.control.set_pause(false);
        self.unwinder = Some(unwinder);
    }

    /// Sets the new instance's wasm globals from the old one's (the plan
    /// says which carry over), and its stack pointer where the mapped stack
    /// puts it.
    fn carry_globals(&mut self, previous: &mut Previous, prepared: &Prepared, stack: &MappedStack) -> Result<(), ApplyError> {
        let store = &mut self.store;
        for (new_index, old_index) in &prepared.plan.globals {
            let value = previous
                .instance
                .get_global(&mut previous.store, &exports::global(*old_index))
                .ok_or(ApplyError::OldGlobalMissing(*old_index))?
                .get(&mut previous.store);
            let global = self
                .instance
                .get_global(&mut *store, &exports::global(*new_index))
                .ok_or(ApplyError::NewGlobalMissing(*new_index))?;
            global.set(&mut *store, value).map_err(|source| ApplyError::SetGlobal { index: *new_index, source })?;
        }
        if let Some(sp) = stack.stack_pointer {
            let new = &prepared.next.version;
            let index = crate::update::stack_pointer_index(new).ok_or(ApplyError::NoStackPointer)?;
            let global = self.instance.get_global(&mut *store, &exports::global(index)).ok_or(ApplyError::StackPointerNotExported)?;
            global.set(&mut *store, wasmtime::Val::I32(sp as i32)).map_err(|source| ApplyError::SetGlobal { index, source })?;
        }
        Ok(())
    }

    /// Steps 3 and 4: state, then the verified rewind.
    fn finish_update(
        &mut self,
        previous: &mut Previous,
        prepared: &Prepared,
        stack: &MappedStack,
        heap: Option<&HeapStep>,
        and_then: impl FnOnce(&mut Self, &[u32]) -> Result<usize, ApplyError>,
    ) -> Result<HeapCounts, ApplyError> {
        let linked = &prepared.linked;
        let store = &mut self.store;
        let u = instrumented(&mut self.unwinder)?;
        let drop_data = self
            .instance
            .get_typed_func::<(), ()>(&mut *store, exports::DROP_DATA)
            .map_err(ApplyError::DropData)?;
        drop_data.call(&mut *store, ()).map_err(ApplyError::DropData)?;

        // A reused area holds what its last version left there.
        if let Some(area) = prepared.fresh {
            if !u.memory.write(u64::from(area.base), &vec![0; area.len as usize]) {
                return Err(ApplyError::FreshOutOfBounds(area.base));
            }
        }
        for (address, bytes) in &linked.writes {
            if !u.memory.write(u64::from(*address), bytes) {
                return Err(ApplyError::FreshOutOfBounds(*address));
            }
        }
        self.carry_globals(previous, prepared, stack)?;
        let u = instrumented(&mut self.unwinder)?;
        // From here on heap conversion, the user's transformers and the
        // constructors the new version adds write memory the old version
        // owns: a failure at any later step must find it as it was.
        let converters = heap.is_some_and(|h| h.plan.kinds.iter().any(|k| k.converter.is_some()));
        let user_code = has_transformers(linked) || !linked.constructors.is_empty() || converters;
        let backup = match heap {
            // C code may write anywhere.
            _ if user_code => Some(Backup::Whole(
                u.memory.read(0, u.memory.size()).ok_or(ApplyError::Backup)?,
            )),
            // Heap conversion writes the slots it rewrites, the new copies
            // (free memory) and the allocator's own bytes: only those.
            Some(h) if !h.plan.slots.is_empty() || !h.plan.objects.is_empty() => {
                Some(Backup::Heap(heap_conversion::Undo::take(&h.plan, &u.memory)?))
            }
            _ => None,
        };
        let converted = match heap {
            Some(h) => heap_conversion::convert(&h.plan, &self.instance, &mut self.store, u).map_err(ApplyError::from),
            None => Ok((HeapCounts::default(), Vec::new())),
        };
        let u = instrumented(&mut self.unwinder)?;
        let converted = converted.and_then(|counts| {
            // After the heap: the tracer rewrote pointers inside the old
            // copies, which these copies carry.
            for conversion in &linked.conversions {
                let (old, new) = (u64::from(conversion.old_address), u64::from(conversion.new_address));
                for c in &conversion.map.copies {
                    if !u.memory.copy_within(old + c.from, new + c.to, c.len) {
                        return Err(ApplyError::ConvertedGlobalOutOfBounds);
                    }
                }
            }
            Ok(counts)
        });
        let (mut counts, new_starts) = match converted {
            Ok(done) => done,
            Err(reason) => {
                if let Some(backup) = &backup {
                    backup.restore(&u.memory);
                }
                return Err(reason);
            }
        };
        let frame_undo = match FrameUndo::apply(stack, &u.memory) {
            Ok(undo) => undo,
            Err(reason) => {
                if let Some(backup) = &backup {
                    backup.restore(&u.memory);
                }
                return Err(reason);
            }
        };
        let mut frames = std::borrow::Cow::Borrowed(&stack.frames);
        if let Some(h) = heap.filter(|h| !h.frame_pointers.is_empty()) {
            counts.rewritten += heap_conversion::rewrite_frames(&h.plan, &new_starts, &h.frame_pointers, frames.to_mut());
        }
        let result = self.transform_and_rewind(linked, &frames, &prepared.next.version).and_then(|()| and_then(self, &new_starts));
        let result = result.map(|rewritten_elsewhere| counts.rewritten += rewritten_elsewhere);
        if let (Ok(()), Some(h)) = (&result, heap) {
            // The new code accepted the frames: the update is done, and the
            // old copies can go. A `free` that fails leaks them; it cannot
            // undo what is done.
            let u = instrumented(&mut self.unwinder)?;
            if let Err(e) = heap_conversion::free_old(&h.plan, &self.instance, &mut self.store, u) {
                tracing::warn!("update: the old copies of converted heap objects were not all freed: {e}");
            }
        }
        match (result, backup) {
            (Ok(()), _) => Ok(counts),
            (Err(reason), None) => {
                frame_undo.restore(&instrumented(&mut self.unwinder)?.memory);
                Err(reason)
            }
            (Err(reason), Some(backup)) => {
                let u = instrumented(&mut self.unwinder)?;
                // In the reverse order of the writes: the frame's moves
                // came after the conversion the backup undoes.
                frame_undo.restore(&u.memory);
                match backup.restore(&u.memory) {
                    true => Err(reason),
                    // Memory only grows, so the backup always fits; the
                    // message says it if that ever stops being true.
                    false => Err(ApplyError::NotRestored { source: Box::new(reason) }),
                }
            }
        }
    }

    /// Runs the C transformers, then the verified rewind: the guest re-enters
    /// every frame and unwinds again at the innermost resume point, before
    /// running any code, and must save exactly the frames it was given.
    fn transform_and_rewind(&mut self, linked: &Linked, mapped: &[TypedFrame], new: &Version) -> Result<(), ApplyError> {
        let store = &mut self.store;
        let u = instrumented(&mut self.unwinder)?;
        run_transformers(&self.instance, store, &u.control, linked)?;
        self.rewind_checked(mapped, new)
    }

    /// Gives the new code the mapped frames and rewinds it, checked.
    pub(crate) fn rewind_checked(&mut self, mapped: &[TypedFrame], new: &Version) -> Result<(), ApplyError> {
        let u = instrumented(&mut self.unwinder)?;
        u.control.set_frames(&write_frames(&mapped.iter().map(TypedFrame::to_raw).collect::<Vec<_>>())).map_err(ApplyError::SetFrames)?;
        u.paused = None;
        u.control.set_verify(true);
        let result = self.checked_rewind(mapped, new);
        instrumented(&mut self.unwinder)?.control.set_verify(false);
        result
    }

    /// Rewinds the mapped frames (already in the control memory) into the
    /// new code with a pause requested, and checks it saves them again.
    fn checked_rewind(&mut self, mapped: &[TypedFrame], new: &Version) -> Result<(), ApplyError> {
        let store = &mut self.store;
        let u = instrumented(&mut self.unwinder)?;
        u.state.start_rewind(&mut *store).map_err(ApplyError::StartRewind)?;
        // A request, not just the flag: a rewind that ends in a blocking
        // call must find its wake-up waiting, or it would block there.
        crate::PauseHandle::new(u.control.clone(), self.interrupt.clone(), None, None).request();
        if let Err(e) = self.call_entry() {
            return Err(ApplyError::Rejected(classify(e, self.source_map.as_deref())));
        }
        let u = instrumented(&mut self.unwinder)?;
        match u.after_return(&mut self.store) {
            Ok(AfterReturn::Paused) => {}
            Ok(_) => return Err(ApplyError::RanOn),
            Err(e) => return Err(e.into()),
        }
        let resaved = u.paused.as_deref().unwrap_or_default();
        frames_disagree(mapped, resaved, &|f| new.info.function_name(f)).map_or(Ok(()), |d| Err(ApplyError::FramesDisagree(d)))
    }
}

/// Where the frames the new code saved again differ from the frames it was
/// given, described for people; `None` when they are the same. A rewind
/// that resumed at another point, or read a frame as another shape, would
/// otherwise pass as a successful pause.
fn frames_disagree(given: &[TypedFrame], resaved: &[TypedFrame], name: &dyn Fn(u32) -> String) -> Option<String> {
    if given.len() != resaved.len() {
        // Frames are innermost first: where the rewind stopped short (or
        // went on) shows at the top of the shorter list.
        let top = |frames: &[TypedFrame]| {
            frames.first().map_or("nothing".to_string(), |f| format!("`{}` at resume point {} innermost", name(f.func), f.resume_point))
        };
        return Some(format!(
            "the new code did not accept the frames: it was given {} ({}) and saved {} again ({})",
            given.len(),
            top(given),
            resaved.len(),
            top(resaved)
        ));
    }
    let (depth, (a, b)) = given.iter().zip(resaved).enumerate().find(|(_, (a, b))| a != b)?;
    let what = if a.func != b.func {
        format!("it resumed in `{}` instead of `{}`", name(b.func), name(a.func))
    } else if a.resume_point != b.resume_point {
        format!("`{}` stopped at resume point {} instead of {}", name(a.func), b.resume_point, a.resume_point)
    } else if a.locals != b.locals {
        format!("`{}` saved other locals than it was given{}", name(a.func), first_difference("local", &slots(&a.locals), &slots(&b.locals)))
    } else {
        format!("`{}` saved other operands than it was given{}", name(a.func), first_difference("operand", &a.operands, &b.operands))
    };
    Some(format!("the new code did not accept the frames: frame {depth} (innermost is 0): {what}"))
}

/// ` (local 3: I32(1) then I32(0))`, or the counts when one list is longer.
/// Saved locals for [`first_difference`]: a local the frame does not
/// save shows as such.
fn slots(locals: &[Option<Value>]) -> Vec<Slot> {
    locals.iter().map(|l| Slot(*l)).collect()
}

/// A local's slot as a message shows it.
#[derive(PartialEq)]
struct Slot(Option<Value>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => f.write_str("not saved"),
        }
    }
}

fn first_difference<T: PartialEq + std::fmt::Debug>(what: &str, given: &[T], resaved: &[T]) -> String {
    match given.iter().zip(resaved).position(|(a, b)| a != b) {
        Some(i) => format!(" ({what} {i}: {:?} then {:?})", given[i], resaved[i]),
        None => format!(" ({} {what}s then {})", given.len(), resaved.len()),
    }
}

fn has_transformers(linked: &Linked) -> bool {
    linked.conversions.iter().any(|c| c.transformer.is_some())
}

/// The unwinder of an instrumented guest; every step of an update needs it.
fn instrumented(unwinder: &mut Option<Unwinder>) -> Result<&mut Unwinder, ApplyError> {
    unwinder.as_mut().ok_or(ApplyError::NotInstrumented)
}

/// Index of the `__stack_pointer` global in `version`.
pub(crate) fn stack_pointer_index(version: &Version) -> Option<u32> {
    upstare_patchgen::symbolic::stack_pointer_global(version)
}

/// Runs the constructors the new version adds, then each conversion's C
/// transformer with the old and new addresses of its global. The caller
/// restores memory if one fails.
fn run_transformers(
    instance: &wasmtime::Instance,
    store: &mut Store<ProcessState>,
    control: &crate::pause::ControlMemory,
    linked: &Linked,
) -> Result<(), ApplyError> {
    control.set_pause(false);
    for (export, name) in &linked.constructors {
        instance
            .get_typed_func::<(), ()>(&mut *store, export)
            .and_then(|f| f.call(&mut *store, ()))
            .map_err(|source| ApplyError::Constructor { name: name.clone(), source })?;
    }
    for conversion in &linked.conversions {
        let Some(name) = &conversion.transformer else { continue };
        let (old, new) = (conversion.old_address, conversion.new_address);
        instance
            .get_typed_func::<(i32, i32), ()>(&mut *store, name)
            .map_err(|source| ApplyError::TransformerSignature { name: name.clone(), source })?
            .call(&mut *store, (old as i32, new as i32))
            .map_err(|source| ApplyError::Transformer { name: name.clone(), source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(func: u32, resume_point: u32, locals: &[i32], operands: &[i32]) -> TypedFrame {
        TypedFrame {
            func,
            resume_point,
            locals: locals.iter().map(|v| Some(Value::I32(*v))).collect(),
            slots: (0..locals.len() as u32).collect(),
            operands: operands.iter().map(|v| Value::I32(*v)).collect(),
        }
    }

    fn disagree(given: &[TypedFrame], resaved: &[TypedFrame]) -> Option<String> {
        frames_disagree(given, resaved, &|f| format!("f{f}"))
    }

    #[test]
    fn the_same_frames_agree() {
        let frames = [frame(3, 1, &[7, 8], &[9]), frame(1, 0, &[], &[])];
        assert_eq!(disagree(&frames, &frames), None);
    }

    #[test]
    fn each_difference_is_named_with_its_frame() {
        let given = [frame(3, 1, &[7, 8], &[9]), frame(1, 0, &[], &[])];
        let cases = [
            ([frame(3, 1, &[7, 8], &[9]), frame(2, 0, &[], &[])], "frame 1 (innermost is 0): it resumed in `f2` instead of `f1`"),
            ([frame(3, 2, &[7, 8], &[9]), frame(1, 0, &[], &[])], "frame 0 (innermost is 0): `f3` stopped at resume point 2 instead of 1"),
            ([frame(3, 1, &[7, 0], &[9]), frame(1, 0, &[], &[])], "frame 0 (innermost is 0): `f3` saved other locals than it was given (local 1: I32(8) then I32(0))"),
            ([frame(3, 1, &[7, 8], &[]), frame(1, 0, &[], &[])], "frame 0 (innermost is 0): `f3` saved other operands than it was given (1 operands then 0)"),
        ];
        for (resaved, expected) in cases {
            assert_eq!(disagree(&given, &resaved), Some(format!("the new code did not accept the frames: {expected}")));
        }
        assert_eq!(
            disagree(&given, &given[1..]),
            Some("the new code did not accept the frames: it was given 2 (`f3` at resume point 1 innermost) and saved 1 again (`f1` at resume point 0 innermost)".into())
        );
    }
}
