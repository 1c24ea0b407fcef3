//! The paused program, as an update reads it before it writes anything:
//! where each thread's shadow stack lies, which of its words and frame
//! values the heap trace and the stale-pointer scan read, and what they
//! find. The host gathers what only a running program tells (each
//! thread's frames and stack pointer, a spawned thread's stack top) and
//! asks [`PausedProgram::check`] once; the answer is what to convert and
//! rewrite, or a typed [`Stale`] saying which value, in which thread,
//! stops the update.
//!
//! The layout facts live here too: where the main thread's shadow stack
//! ends in the running layout ([`stack_top`]), and where wasi-libc's
//! thread start keeps a spawned thread's ([`thread_stack_top_address`]);
//! and, after an update, which memory ranges a retiring version left that
//! nothing points into any more ([`unreferenced`]).

use std::collections::HashSet;

use upstare_instrument::abi::{Metadata, TypedFrame, Value};

use crate::frames::MappedStack;
use crate::heap::stale::{self, Holder, Place};
use crate::heap::{self, MemoryView, Moved, Region};
use crate::plan::{Linked, Plan};
use crate::version::Version;

/// The top of the main thread's shadow stack in the running layout:
/// wasm-ld's `__stack_high`, else `__heap_base` (the stack ends where the
/// heap starts).
pub fn stack_top(version: &Version) -> Option<u32> {
    ["__stack_high", "__heap_base"].iter().find_map(|name| {
        let i = version.info.symbols.iter().position(|s| s.is_absolute() && s.name.as_deref() == Some(*name))?;
        version.layout.data.get(&(i as u32)).copied().or(version.info.symbols[i].data().map(|d| d.address))
    })
}

/// Where a spawned thread's stack top is, given the `arg` it starts with
/// (`wasi_thread_start(tid, arg)`): wasi-libc's `pthread_create` passes
/// the address of its `struct start_args`, whose first member is the top
/// of the stack it allocated for the thread (its start code loads it into
/// `__stack_pointer`). Read the 32-bit word there before the thread runs.
pub fn thread_stack_top_address(arg: u32) -> u32 {
    arg
}

/// The ranges of `candidates` (base, length) that nothing in the paused
/// program points into: no frame value, no word of a global or of the live
/// shadow stack (above `stack_pointer`) in the `running` layout, and no
/// word of a candidate something points into (followed transitively). The
/// heap is not searched, so as not to make the pause depend on its size.
pub fn unreferenced(
    candidates: &[(u32, u32)],
    frames: &[TypedFrame],
    running: &Version,
    memory: &dyn MemoryView,
    stack_pointer: Option<u32>,
) -> Vec<(u32, u32)> {
    let mut dead: Vec<(u32, u32)> = candidates.to_vec();
    let mut live: Vec<(u32, u32)> = Vec::new();
    let inside = |value: u32, (base, len): (u32, u32)| value >= base && u64::from(value) < u64::from(base) + u64::from(len);
    let pin = |value: u32, dead: &mut Vec<(u32, u32)>, live: &mut Vec<(u32, u32)>| {
        if let Some(i) = dead.iter().position(|r| inside(value, *r)) {
            live.push(dead.swap_remove(i));
        }
    };
    for value in frames.iter().flat_map(|f| f.locals.iter().flatten().chain(&f.operands)) {
        if let Value::I32(v) = value {
            pin(*v as u32, &mut dead, &mut live);
        }
    }
    let mut regions: Vec<(u32, u32)> = stale::pointer_holders(running, stack_pointer).into_iter().map(|h| (h.address, h.size)).collect();
    while !dead.is_empty() {
        let Some((at, size)) = regions.pop() else { break };
        let pinned = live.len();
        // Out of bounds reads as nothing: nothing there to point anywhere.
        for (_, word) in heap::words(memory, at, size) {
            pin(word, &mut dead, &mut live);
        }
        regions.extend_from_slice(&live[pinned..]);
    }
    dead
}

/// One paused thread: what the host read of it, and its frames mapped to
/// the new version.
#[derive(Debug, Clone, Copy)]
pub struct PausedThread<'a> {
    /// The thread's id; `None` for the main thread.
    pub tid: Option<u32>,
    /// Its frames as it saved them, innermost first.
    pub frames: &'a [TypedFrame],
    /// The value of its `__stack_pointer` global, if the module has one.
    pub stack_pointer: Option<u32>,
    /// Where a spawned thread's shadow stack ends (the word at
    /// [`thread_stack_top_address`]); the main thread's is the layout's.
    pub stack_top: Option<u32>,
    /// Its frames mapped to the new version.
    pub mapped: &'a MappedStack,
}

impl<'a> PausedThread<'a> {
    /// The old frames whose values still matter once the mapped stack is
    /// in place, and where the live shadow stack then starts
    /// ([`MappedStack::kept`]).
    pub fn kept(&self) -> (&'a [TypedFrame], Option<u32>) {
        self.mapped.kept(self.frames, self.stack_pointer)
    }

    /// The live part of a spawned thread's shadow stack, once the mapped
    /// stack is in place; `None` for the main thread (its stack is one of
    /// [`stale::pointer_holders`]).
    fn live_stack(&self) -> Option<Holder> {
        let tid = self.tid?;
        let (_, from) = self.kept();
        from.zip(self.stack_top).map(|(from, top)| Holder {
            name: format!("the shadow stack of thread {tid}"),
            address: from,
            size: top.saturating_sub(from),
        })
    }
}

/// A paused program: its running version, its memory and its threads.
pub struct PausedProgram<'a> {
    /// The version that runs.
    pub version: &'a Version,
    /// Its linear memory, paused.
    pub memory: &'a dyn MemoryView,
    /// The main thread.
    pub main: PausedThread<'a>,
    /// The other threads, each with its id.
    pub workers: Vec<PausedThread<'a>>,
}

/// What [`PausedProgram::check`] found to do.
#[derive(Debug, Default)]
pub struct Findings {
    /// The heap objects to convert and the pointers to rewrite, when some
    /// root reaches a changed type.
    pub heap: Option<heap::Plan>,
    /// The main thread's mapped frame locals to rewrite, as (frame,
    /// local).
    pub frame_pointers: Vec<(usize, usize)>,
    /// The same for each of the other threads, in the order of
    /// [`PausedProgram::workers`].
    pub thread_frame_pointers: Vec<Vec<(usize, usize)>>,
}

/// What a value that would go stale points into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Target {
    /// A frame variable of this spawned thread that moves.
    #[error("a variable of a frame of thread {0} that moves: it would still point at the variable's old place")]
    ThreadVariable(u32),
    /// The main thread's stack under the frame of this function, rebuilt
    /// where it stands.
    #[error("the stack of `{0}`, whose frame is rebuilt where it stands: it would still point at the old place")]
    RebuiltStack(String),
    /// A variable of the main thread's frame that goes back to its loop
    /// header.
    #[error("a variable of the frame that goes back to its loop header: it would still point at the variable's old place")]
    RetreatingVariable,
    /// The old copy of this global, whose type changed.
    #[error("`{0}`, whose type changed: it would still point at the old copy")]
    ConvertedGlobal(String),
    /// A heap object of this type, which the update converts.
    #[error("a heap object of type {0}, which the update converts")]
    ConvertedObject(String),
    /// An allocation no typed pointer reaches, which may hold objects of a
    /// changed struct that would not be converted.
    #[error(
        "an allocation of {} bytes that no typed pointer reaches: it may hold `struct {}`, whose type changed, and would not be converted",
        .0.size,
        .0.tag
    )]
    UntypedAllocation(heap::Suspicion),
}

/// A value that would go stale: in which thread, where, and into what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The thread that holds it; `None` for the main thread.
    pub thread: Option<u32>,
    /// Where it is.
    pub place: Place,
    /// What it would point into.
    pub target: Target,
}

impl std::fmt::Display for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(tid) = self.thread {
            write!(f, "in thread {tid}: ")?;
        }
        write!(f, "{} holds the address of {}", self.place, self.target)
    }
}

/// Why the paused program cannot take the update as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    /// The heap trace refused (see [`heap::trace`]).
    #[error("{0}")]
    Heap(String),
    /// The program holds, right now, a value that would point where
    /// nothing will be; it may let go of it as it runs on.
    #[error("{0}")]
    Held(Holding),
    /// A frame holds the address of a converted heap object where it has
    /// no pointer type (see [`heap::frame_pointers`]); for a spawned
    /// thread, the message names it.
    #[error("{0}")]
    Frame(String),
}

impl PausedProgram<'_> {
    /// Traces the heap for the update `plan` (placed as `linked`) and scans
    /// every thread for values that would go stale: the one question the
    /// host asks before it writes anything. `old_meta` describes the
    /// running module's resume points (frames are typed only with it);
    /// `new` and `new_meta` the next version.
    pub fn check(&self, plan: &Plan, linked: &Linked, old_meta: Option<&Metadata>, new: &Version, new_meta: &Metadata) -> Result<Findings, Stale> {
        let heap = self.trace(plan, linked, old_meta, new, new_meta).map_err(Stale::Heap)?;
        self.find_held(linked, heap.as_ref()).map_or(Ok(()), |h| Err(Stale::Held(h)))?;
        let Some(h) = &heap else {
            return Ok(Findings { heap, frame_pointers: Vec::new(), thread_frame_pointers: vec![Vec::new(); self.workers.len()] });
        };
        self.find_untyped_holder(h, new).map_or(Ok(()), |holding| Err(Stale::Held(holding)))?;
        let frame_pointers = heap::frame_pointers(h, &self.main.mapped.frames, new, new_meta).map_err(Stale::Frame)?;
        let thread_frame_pointers = self
            .workers
            .iter()
            .map(|w| {
                heap::frame_pointers(h, &w.mapped.frames, new, new_meta)
                    .map_err(|e| Stale::Frame(format!("in thread {}: {e}", w.tid.unwrap_or_default())))
            })
            .collect::<Result<_, _>>()?;
        Ok(Findings { heap, frame_pointers, thread_frame_pointers })
    }

    /// Traces the paused heap; `None` when no root reaches a changed type.
    fn trace(&self, plan: &Plan, linked: &Linked, old_meta: Option<&Metadata>, new: &Version, new_meta: &Metadata) -> Result<Option<heap::Plan>, String> {
        let main = &self.main;
        let (_, stack_from) = main.kept();
        let mut frame_roots = heap::FrameRoots::default();
        // Typing the frames analyses each one's code: only when some
        // global or struct changed type, so that an ordinary update's pause
        // pays nothing for it (onto itself, `--stress-update`, nothing
        // changes).
        if let Some(old_meta) = old_meta.filter(|_| plan.heap_roots.any_changed() && !std::ptr::eq(self.version, new)) {
            let main_top = stack_top(self.version);
            let threads = std::iter::once((main, main_top)).chain(self.workers.iter().map(|w| (w, w.stack_top)));
            for (thread, top) in threads {
                let in_place = thread.kept().0.len();
                let (frames, sp, mapped) = (thread.frames, thread.stack_pointer, &thread.mapped.frames);
                let roots = heap::frame_roots(self.version, old_meta, frames, sp, top, new, new_meta, mapped, in_place);
                frame_roots.memory.extend(roots.memory);
                frame_roots.values.extend(roots.values);
                frame_roots.dead.extend(roots.dead);
            }
        }
        let thread_stacks: Vec<Holder> = self.workers.iter().filter_map(PausedThread::live_stack).collect();
        frame_roots.thread_stacks_from = thread_stacks.iter().map(|h| h.address).collect();
        let moved = linked
            .conversions
            .iter()
            .map(|c| Moved {
                name: c.key.to_string(),
                old_address: c.old_address,
                old_size: c.old_size,
                new_address: c.new_address,
                map: c.map.clone(),
            })
            .collect();
        let live = stack_from
            .zip(stack_top(self.version))
            .map(|(sp, top)| Region { address: sp, size: top.saturating_sub(sp), what: "the shadow stack".into() });
        let threads = thread_stacks.into_iter().map(|h| Region { address: h.address, size: h.size, what: h.name });
        // Shadow-stack bytes the frame mapping moves are scanned untyped:
        // their pointers are not rewritten.
        let moving = main.mapped.moves.iter().map(|&(from, _, len)| Region {
            address: from,
            size: u32::try_from(len).unwrap_or(u32::MAX),
            what: "the memory of a frame that moves to its new layout".into(),
        });
        let untyped = live.into_iter().chain(threads).chain(moving).collect();
        heap::trace(self.version, &plan.new, &plan.heap_roots, &frame_roots, moved, self.memory, untyped)
    }

    /// The first frame value or stack word, in any thread, that holds the
    /// start of an allocation the trace could not type and that may hold
    /// objects of a changed struct ([`heap::Plan::suspect_at`]). Such a
    /// value is most often a temporary, gone a moment later, so the update
    /// waits for it like for a held pointer.
    fn find_untyped_holder(&self, heap: &heap::Plan, new: &Version) -> Option<Holding> {
        let threads = std::iter::once(&self.main).chain(&self.workers);
        let in_frames = threads.into_iter().find_map(|t| {
            let (f, suspicion) = heap::untyped_frame_holder(heap, &t.mapped.frames)?;
            let function = new.info.function_name(t.mapped.frames[f].func);
            Some(Holding { thread: t.tid, place: Place::Frame(function), target: Target::UntypedAllocation(suspicion) })
        });
        in_frames.or_else(|| {
            let (what, suspicion) = heap.untyped_stack_holder.clone()?;
            Some(Holding { thread: None, place: Place::Memory(what), target: Target::UntypedAllocation(suspicion) })
        })
    }

    /// The first value, in any thread, that would point at the old place
    /// of what moves: a frame variable (a thread's that moves, the main
    /// thread's retreating or rebuilt frame), then a converted global.
    fn find_held(&self, linked: &Linked, heap: Option<&heap::Plan>) -> Option<Holding> {
        let main = &self.main;
        let (kept, stack_from) = main.kept();
        // Typed pointers the tracer found are rewritten, wherever they
        // point. Only those in the globals and the shadow stack matter to
        // the scan; the heap's lie above both.
        let holders = stale::pointer_holders(self.version, stack_from);
        let holders_end = holders.iter().map(|h| h.address.saturating_add(h.size)).max().unwrap_or(0);
        let rewritten: HashSet<u32> =
            heap.iter().flat_map(|h| h.slots.iter().map(|(slot, _)| *slot)).filter(|&slot| slot < holders_end).collect();
        let inside = |v: u32, &(from, _, len): &(u32, u32, u64)| v >= from && u64::from(v - from) < len;
        let moved_from = |v: u32| {
            if let Some(w) = self.workers.iter().find(|w| w.mapped.moves.iter().any(|m| inside(v, m))) {
                return Some(Target::ThreadVariable(w.tid.unwrap_or_default()));
            }
            main.mapped.moves.iter().any(|m| inside(v, m)).then(|| match &main.mapped.rebuilt {
                Some(r) => Target::RebuiltStack(r.frame.clone()),
                None => Target::RetreatingVariable,
            })
        };
        let converted = |v: u32| {
            linked
                .conversions
                .iter()
                .find(|c| v >= c.old_address && v - c.old_address < c.old_size.max(1))
                .map(|c| Target::ConvertedGlobal(c.key.to_string()))
        };
        // Each check in the main thread, then in the others.
        let find = |target: &dyn Fn(u32) -> Option<Target>, skip: bool| {
            let in_main = stale::find_pointer(kept, self.version, self.memory, &holders, target, skip, &rewritten)
                .map(|(place, target)| Holding { thread: None, place, target });
            in_main.or_else(|| {
                self.workers.iter().find_map(|w| {
                    let holders: Vec<Holder> = w.live_stack().into_iter().collect();
                    stale::find_pointer(w.kept().0, self.version, self.memory, &holders, target, skip, &HashSet::new())
                        .map(|(place, target)| Holding { thread: w.tid, place, target })
                })
            })
        };
        find(&moved_from, false).or_else(|| find(&converted, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_value_names_its_thread_its_place_and_its_target() {
        let main = Holding { thread: None, place: Place::Memory("global `line`".into()), target: Target::RebuiltStack("serve".into()) };
        assert_eq!(
            Stale::Held(main).to_string(),
            "global `line` holds the address of the stack of `serve`, whose frame is rebuilt where it stands: it would still point at the old place"
        );
        let worker = Holding { thread: Some(3), place: Place::Frame("work".into()), target: Target::ConvertedObject("struct job".into()) };
        assert_eq!(
            Stale::Held(worker).to_string(),
            "in thread 3: a frame of `work` holds the address of a heap object of type struct job, which the update converts"
        );
    }
}
