//! The other threads of a multi-threaded program in an update. Each parked
//! worker's frames are mapped to the new version as the main thread's are
//! (from its own stack pointer, so a frame may go back to its loop header
//! or be rebuilt where it stands), it joins patchgen's checks of the
//! paused program and its heap trace ([`upstare_patchgen::paused`]), and,
//! once the main thread has moved and the new code accepted its frames,
//! each worker moves to the new version in a store of its own, its frame
//! locals that point at converted heap objects rewritten. A worker the new
//! code does not accept undoes every worker moved before it, and the main
//! thread's own rollback follows: all threads move, or none.

use std::sync::{Arc, Mutex};

use upstare_instrument::abi::TypedFrame;
use upstare_instrument::Metadata;
use upstare_patchgen::frames::{MappedStack, Unmappable};
use upstare_patchgen::heap;
use upstare_patchgen::paused::PausedThread;
use upstare_patchgen::version::Version;

use super::{instrumented, ApplyError, FrameUndo, Prepared, Previous, UpdateError};
use crate::pause_group::lock;
use crate::program_memory::ProgramMemory;
use crate::threads::Threads;
use crate::Guest;

/// A parked worker, what it was paused with, and its frames mapped to the
/// new version.
pub(super) struct ThreadStep {
    tid: u32,
    guest: Arc<Mutex<Guest>>,
    frames: Vec<TypedFrame>,
    stack_pointer: Option<u32>,
    stack_top: Option<u32>,
    stack: MappedStack,
}

impl ThreadStep {
    /// The worker as patchgen's checks read it.
    pub(super) fn paused(&self) -> PausedThread<'_> {
        PausedThread {
            tid: Some(self.tid),
            frames: &self.frames,
            stack_pointer: self.stack_pointer,
            stack_top: self.stack_top,
            mapped: &self.stack,
        }
    }
}

/// A worker moved to the new version, with what undoes it.
pub(super) struct Moved {
    guest: Arc<Mutex<Guest>>,
    previous: Previous,
    frames: FrameUndo,
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
        let stack = prepared.frames.map_paused(&frames, sp, memory).map_err(|e| UpdateError::Frame(in_thread(tid, e)))?;
        let stack_top = g.thread_stack_top();
        drop(g);
        steps.push(ThreadStep { tid, guest, frames, stack_pointer: sp, stack_top, stack });
    }
    Ok(steps)
}

/// The heap conversion's part in the workers' frames: the locals of each
/// worker's mapped frames that point at converted objects, and where the
/// new copies went.
pub(super) struct HeapRewrites<'a> {
    pub(super) plan: &'a heap::Plan,
    pub(super) new_starts: &'a [u32],
    /// Per worker, in the order of the steps: (mapped frame, local).
    pub(super) locals: &'a [Vec<(usize, usize)>],
}

/// Moves every worker to the new version: its own instance, its globals,
/// its frame variables, its frames (their pointers to converted heap
/// objects rewritten) rewound into the new code and checked. On failure
/// every worker is back as it was. Also returns how many frame locals were
/// rewritten.
pub(super) fn apply(
    steps: &[ThreadStep],
    prepared: &Prepared,
    metadata: &Arc<Metadata>,
    heap: Option<HeapRewrites<'_>>,
) -> Result<(Vec<Moved>, usize), ApplyError> {
    let mut moved: Vec<Moved> = Vec::with_capacity(steps.len());
    let mut rewritten = 0;
    for (i, step) in steps.iter().enumerate() {
        let mut frames = std::borrow::Cow::Borrowed(&step.stack.frames);
        if let Some(h) = &heap {
            if let Some(locals) = h.locals.get(i).filter(|l| !l.is_empty()) {
                rewritten += crate::heap_conversion::rewrite_frames(h.plan, h.new_starts, locals, frames.to_mut());
            }
        }
        match move_one(step, &frames, prepared, metadata) {
            Ok(m) => moved.push(m),
            Err(reason) => {
                undo(moved);
                return Err(ApplyError::Thread { tid: step.tid, source: Box::new(reason) });
            }
        }
    }
    Ok((moved, rewritten))
}

/// Moves one worker, rewinding it into `frames` (its mapped frames, their
/// heap pointers rewritten).
fn move_one(step: &ThreadStep, frames: &[TypedFrame], prepared: &Prepared, metadata: &Arc<Metadata>) -> Result<Moved, ApplyError> {
    let mut g = lock(&step.guest);
    let (memory, control) = {
        let u = instrumented(&mut g.unwinder)?;
        (u.memory.clone(), u.control.clone())
    };
    // Each thread has its own control memory, so its own link of the new
    // module; the main thread's was made before the pause.
    // A worker always belongs to a program's threads; its link is that
    // program's linker with this thread's control memory.
    let threads = g.threads.clone().ok_or_else(|| ApplyError::Link(wasmtime::Error::msg("a worker without its program's threads")))?;
    let instance_pre = threads
        .linker(&g.store, Some(&control))
        .and_then(|linker| linker.instantiate_pre(prepared.next.module.module()))
        .map_err(ApplyError::Link)?;
    let mut previous = g.switch_to(&prepared.next.module, &instance_pre, metadata.clone())?;
    let carried = g.carry_globals(&mut previous, prepared, &step.stack).and_then(|()| FrameUndo::apply(&step.stack, &memory));
    let frame_undo = match carried {
        Ok(frame_undo) => frame_undo,
        Err(reason) => {
            g.switch_back(previous);
            return Err(reason);
        }
    };
    if let Err(reason) = g.rewind_checked(frames, &prepared.next.version) {
        frame_undo.restore(&memory);
        g.switch_back(previous);
        return Err(reason);
    }
    drop(g);
    Ok(Moved { guest: step.guest.clone(), previous, frames: frame_undo })
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
