//! The other threads of a multi-threaded program in an update. Each parked
//! worker's frames are mapped to the new version as the main thread's are
//! (from its own stack pointer, so a frame may go back to its loop header
//! or be rebuilt where it stands), its frames and the live part of its
//! shadow stack join the scan for pointers that would go stale, and, once
//! the main thread has moved and the new code accepted its frames, each
//! worker moves to the new version in a store of its own. A worker the new
//! code does not accept undoes every worker moved before it, and the main
//! thread's own rollback follows: all threads move, or none.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use upstare_instrument::abi::TypedFrame;
use upstare_instrument::Metadata;
use upstare_patchgen::frames::{MappedStack, Unmappable};
use upstare_patchgen::heap::stale::{self, Holder};
use upstare_patchgen::heap;
use upstare_patchgen::version::Version;

use super::{instrumented, kept_frames, map_frames, FrameUndo, Prepared, Previous, UpdateError};
use crate::module::one_line;
use crate::program_memory::ProgramMemory;
use crate::threads::Threads;
use crate::Guest;

/// A parked worker and its frames mapped to the new version.
pub(super) struct ThreadStep {
    tid: u32,
    guest: Arc<Mutex<Guest>>,
    stack: MappedStack,
    /// The old frames that stay (those not dropped or rebuilt), for the
    /// stale-pointer scan.
    kept: Vec<TypedFrame>,
    /// The live part of its shadow stack, for the same scan.
    live_stack: Option<Holder>,
}

/// A worker moved to the new version, with what undoes it.
pub(super) struct Moved {
    guest: Arc<Mutex<Guest>>,
    previous: Previous,
    frames: FrameUndo,
}

fn lock(guest: &Mutex<Guest>) -> MutexGuard<'_, Guest> {
    // A worker's OS thread that panicked left its guest as its last call
    // did; the update reads and replaces it whole.
    guest.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Names the thread a frame that cannot move is in.
fn in_thread(tid: u32, mut e: Unmappable) -> Unmappable {
    e.reason = format!("{} (in thread {tid})", e.reason);
    e
}

/// Maps the frames of every parked worker of `threads`.
pub(super) fn plan(threads: &Threads, current: &Version, prepared: &Prepared, memory: &ProgramMemory) -> Result<Vec<ThreadStep>, UpdateError> {
    let parked = threads.parked();
    if parked.len() != threads.count() {
        return Err(UpdateError::Refused(format!(
            "{} of the program's threads did not pause",
            threads.count() - parked.len().min(threads.count())
        )));
    }
    let mut steps = Vec::new();
    for (tid, guest) in parked {
        let mut g = lock(&guest);
        let frames = g
            .unwinder
            .as_ref()
            .and_then(|u| u.paused.clone())
            .ok_or_else(|| UpdateError::Refused(format!("thread {tid} is not paused")))?;
        let sp = g.stack_pointer(current);
        let stack = map_frames(prepared, &frames, sp, memory).map_err(|e| UpdateError::Frame(in_thread(tid, e)))?;
        let (kept, stack_from) = kept_frames(&frames, &stack, sp);
        let live_stack = stack_from.zip(g.thread_stack_top()).map(|(from, top)| Holder {
            name: format!("the shadow stack of thread {tid}"),
            address: from,
            size: top.saturating_sub(from),
        });
        let kept = kept.to_vec();
        drop(g);
        steps.push(ThreadStep { tid, guest, stack, kept, live_stack });
    }
    Ok(steps)
}

/// Where the workers' frame variables move: a pointer to their old place
/// would go stale, wherever it is.
pub(super) fn moves(steps: &[ThreadStep]) -> impl Iterator<Item = (u32, u32, u64, u32)> + '_ {
    steps.iter().flat_map(|s| s.stack.moves.iter().map(move |(from, to, len)| (*from, *to, *len, s.tid)))
}

/// The first address `target` says would go stale in a worker's frames or
/// shadow stack, as a message.
pub(super) fn find_stale(
    steps: &[ThreadStep],
    version: &Version,
    memory: &ProgramMemory,
    target: &dyn Fn(u32) -> Option<String>,
    skip_targets: bool,
) -> Option<String> {
    steps.iter().find_map(|s| {
        let holders: Vec<Holder> = s.live_stack.iter().cloned().collect();
        stale::find_pointer(&s.kept, version, memory, &holders, target, skip_targets, &HashSet::new())
            .map(|m| format!("in thread {}: {m}", s.tid))
    })
}

/// The workers' live shadow stacks, for the heap trace to scan untyped.
pub(super) fn live_stacks(steps: &[ThreadStep]) -> Vec<(u32, u32, String)> {
    steps.iter().filter_map(|s| s.live_stack.as_ref().map(|h| (h.address, h.size, h.name.clone()))).collect()
}

/// The first value in a worker's frames that points into a heap object the
/// update converts, as a refusal: the trace types the main thread's frames
/// alone, so nothing would rewrite it.
pub(super) fn find_converted(steps: &[ThreadStep], plan: &heap::Plan, version: &Version, memory: &ProgramMemory) -> Option<String> {
    let converted = |v: u32| {
        plan.objects
            .iter()
            .find(|o| v >= o.start && u64::from(v - o.start) < u64::from(o.count) * u64::from(o.kind.old_size))
            .map(|o| format!("a heap object of type {}, which the update converts", o.kind.type_name))
    };
    steps.iter().find_map(|s| {
        stale::find_pointer(&s.kept, version, memory, &[], &converted, false, &HashSet::new())
            .map(|m| format!("in thread {}: {m}; only the main thread's frames are rewritten", s.tid))
    })
}

/// Moves every worker to the new version: its own instance, its globals,
/// its frame variables, its frames rewound into the new code and checked.
/// On failure every worker is back as it was.
pub(super) fn apply(steps: &[ThreadStep], prepared: &Prepared, metadata: &Arc<Metadata>) -> Result<Vec<Moved>, String> {
    let mut moved: Vec<Moved> = Vec::with_capacity(steps.len());
    for step in steps {
        match move_one(step, prepared, metadata) {
            Ok(m) => moved.push(m),
            Err(reason) => {
                undo(moved);
                return Err(format!("thread {}: {reason}", step.tid));
            }
        }
    }
    Ok(moved)
}

fn move_one(step: &ThreadStep, prepared: &Prepared, metadata: &Arc<Metadata>) -> Result<Moved, String> {
    let mut g = lock(&step.guest);
    let (memory, control) = {
        let u = instrumented(&mut g.unwinder)?;
        (u.memory.clone(), u.control.clone())
    };
    // Each thread has its own control memory, so its own link of the new
    // module; the main thread's was made before the pause.
    let threads = g.threads.clone().ok_or("a worker without its program's threads")?;
    let instance_pre = threads
        .linker(&g.store, Some(&control))
        .and_then(|linker| linker.instantiate_pre(prepared.next.module.module()))
        .map_err(|e| format!("cannot link the new version: {}", one_line(&e)))?;
    let mut previous = g.switch_to(prepared, &instance_pre, metadata.clone())?;
    let carried = g.carry_globals(&mut previous, prepared, &step.stack).and_then(|()| FrameUndo::apply(&step.stack, &memory));
    let frames = match carried {
        Ok(frames) => frames,
        Err(reason) => {
            g.switch_back(previous);
            return Err(reason);
        }
    };
    if let Err(reason) = g.rewind_checked(&step.stack.frames, &prepared.next.version) {
        frames.restore(&memory);
        g.switch_back(previous);
        return Err(reason);
    }
    drop(g);
    Ok(Moved { guest: step.guest.clone(), previous, frames })
}

/// Puts moved workers back on the old version, last moved first.
pub(super) fn undo(moved: Vec<Moved>) {
    for Moved { guest, previous, frames } in moved.into_iter().rev() {
        let mut g = lock(&guest);
        if let Some(u) = &g.unwinder {
            frames.restore(&u.memory);
        }
        g.switch_back(previous);
    }
}
