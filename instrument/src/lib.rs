//! `upstare-instrument` rewrites a WebAssembly module so that a host can
//! unwind its whole call stack into typed frames at an *update point*, and
//! later rewind it, into the same module or into its next version.
//!
//! # What the output looks like
//!
//! The rewrite keeps the original: local indices, globals, tables, element
//! and data segment indices and imported functions stay as they were, and
//! the operators of every function body are copied byte for byte except
//! for branches whose depth changes and the indices of the functions it
//! calls. Those move: the helper functions the instrumenter adds come
//! before the original's defined functions, which wasmtime then compiles
//! sooner (`rewrite::order`), and each defined function moves up by their
//! number. (A module that uses `memory.atomic.wait32`, `wait64` or
//! `notify` also gets those instructions lowered to calls of host imports
//! first, [`abi::futex`], whose new imports move its defined functions up
//! once more.) The metadata speaks of the original's function indices and
//! offsets, and `upstare.offsets` ([`abi::offsets`]) maps each output
//! function back to the original. The rest of what the instrumenter adds
//! is appended: types, a mutable `upstare_state` global, side tables for
//! reference-typed frame slots, exports, and the `upstare.meta` custom
//! section ([`abi::metadata`]).
//!
//! Memory moves to the host: the program memory becomes the import
//! `upstare.memory` (index 0, same minimum, always shared so that the next
//! version can import the same memory from a fresh store), and a second, shared memory
//! `upstare.control` (index 1) holds a small control header and the frame
//! stack ([`abi::control`], [`abi::frame`]). Active data segments become
//! passive; `upstare_init_memory` applies them on a fresh memory, and an
//! instance created over live memory (an update) calls `upstare_drop_data`
//! instead. A start function is not run by instantiation: it is exported as
//! `upstare_start` for the host to call after initialising memory.
//!
//! # Update points and states
//!
//! Update points are loop headers (except those of bounded loops, below),
//! calls to imports the host marks as blocking ([`Options::blocking`]),
//! atomic waits (lowered to blocking calls of the host's futex, so that a
//! thread blocked in one can be paused; [`abi::ResumeKind::AtomicWait`]), and
//! the entries of a *feedback set* of the functions on cycles of calls:
//! some of them, such that every cycle passes through one, so that
//! recursion without loops reaches an update point too. Every function on
//! a cycle keeps a resume point at its entry, so that a frame unwound there
//! by a version whose set held the function can rewind into one whose set
//! does not; only the set's members check on every call (the stress
//! variant checks them all). A function is instrumented only if it can be on
//! the stack when an unwind starts (see `callgraph`): it is on a call
//! cycle, has a reachable loop that is not bounded, a
//! call to a blocking import, or a call (direct, or indirect through a
//! signature some such function has) to a function that can. All other
//! functions are copied unchanged but for the indices they call.
//!
//! Two kinds of code get no update point because their running time is
//! bounded by a budget (`bound` checks the rules): a *bounded loop*, whose
//! counter runs from a constant by a constant step against a constant bound,
//! or is shifted right or divided by a constant towards zero while the loop
//! goes on only under a test that fails at zero (a digit loop), for at most
//! 64 iterations either way, calls nothing that can unwind, and costs at
//! most 4,096 instructions (its trip count times its body, nested bounded
//! loops and short callees included); and a *short function*, whose loops
//! are all bounded and whose cost is at most 4,096 instructions: it is not
//! instrumented, and calls to it are no resume points.
//!
//! # The pause bound
//!
//! From the moment a pause is requested, the guest reaches an update point
//! (or returns from the call the host made) after a bounded amount of work.
//! Take a path through one activation of an instrumented function that
//! passes no update point. It crosses no back edge of a loop with a check
//! (that loop's header is an update point), so every back edge it crosses
//! belongs to a bounded loop, which it runs to the end at a cost of at most
//! 4,096 instructions. Seen with each bounded loop as one step, the path is
//! acyclic, so it is no longer than the function's code. Each call on it
//! is either to an uninstrumented function, which costs at most 4,096
//! instructions if it has loops and otherwise at most its code and its
//! callees' (uninstrumented functions are on no call cycle, so that is a
//! finite sum), or to an instrumented function, where the same argument
//! applies; and such a chain of calls cannot come back to a function already
//! on it without passing an entry check, since the calls between the two
//! activations close a cycle, and every cycle passes through a member of
//! the feedback set. So the work until the
//! next update point is at most, for each frame on the stack when the
//! request comes, one such path in it and in the chain of calls it makes:
//! bounded by the stack depth times the code of the program, plus at most
//! 4,096 instructions for every bounded loop and short call on those paths.
//!
//! Outside the argument, as in the original program: an import that does
//! not block is assumed to return promptly, and `memory.copy`,
//! `memory.fill` and `memory.grow` are single instructions whose time
//! grows with their operands. wasi-libc's `memcpy`, `memset` and `strlen`
//! loop over their length without bound, so they keep their checks and
//! calls to them stay resume points (`docs/PERFORMANCE.md` has the
//! measurement behind that choice).
//!
//! The argument holds for both instrumentation variants (below): in each,
//! the check at a loop header unwinds whenever the pause byte is set, and
//! the other update points are the same in both. It does not depend on
//! which locals a frame saves: saving fewer changes no path.
//!
//! `upstare_state` is 0 (normal), 1 (unwinding) or 2 (rewinding). In the
//! normal state the only added work is, at each loop header, one
//! `i32.load16_u` of the control header's pause and rewind bytes and a
//! branch (before each `call_indirect` that can unwind, whose callee may be
//! an interrupted blocking import where a rewind must end, a load of the
//! whole flag word and a branch), and after each call that can unwind, a
//! `global.get` of the state and a branch. Those bytes are nonzero only
//! while a pause is requested or a rewind runs.
//!
//! An instrumented function, in outline:
//!
//! ```text
//! block $done
//!   block $class_0 ... block $class_n   ;; one per save class, see below
//!     block (result ...)            ;; the original body
//!       if state == REWINDING       ;; rewind prologue
//!         pop my frame; restore the saved operands; br_table on the
//!         frame's resume point to the anchor on the path to it (through
//!         the enclosing blocks, see `plan`); the case that reaches the
//!         point restores the locals it saved, then branches
//!       end
//!       ...original code...
//!       loop
//!         if pause|rewind bytes != 0
//!           [if state == REWINDING: dispatch to a point inside the loop]
//!           $rp = K; br $class_of_K
//!         end
//!         ...
//!       end
//!       call $f  (if state != NORMAL { $rp = J; br $class_of_J })
//!     end
//!     return
//!   end  ;; $class_n: push a frame {func, $rp, class n's locals, operands}
//!   br $done
//!   ...
//! end
//! state = UNWINDING; return zeros
//! ```
//!
//! The loop check's cold path calls nothing and never goes back to the
//! header: it unwinds, or, in a rewind to a point inside the loop,
//! dispatches there. A rewind to the loop header itself ends in the
//! dispatch of the level around the loop, right before the `loop`, which
//! then starts as on any entry (so a checked rewind, with a pause
//! requested, stops again at the check). A call on the cold path, or a
//! branch from it back to the header, would make Cranelift keep every
//! value live across the loop in a stack slot (its calling convention
//! keeps no float register across a call).
//!
//! With [`Options::stress`] the loop check is the *stress variant*: it
//! calls `should_pause`, which also counts down the stress period, and a
//! rewind to a header ends in the check and runs on into the loop, so a
//! guest paused again at once still makes progress. `--stress-pause` and
//! `--stress-update` run it. A checked function entry (which is in no
//! loop) always has this shape, but outside the stress variant its pause
//! decision is the pause byte, as at a loop header, not a call: a call on
//! the cold path would keep the params in callee-saved registers, saved
//! and restored on every call. The end of a rewind is inline code, not a
//! call to `rewind_done`, for the same reason.
//!
//! # What a frame holds
//!
//! A frame saves the values of exactly the locals live at its resume point
//! ([`liveness`], the analysis patchgen uses too), numbers grouped by type,
//! then the operands below the anchor; the metadata lists, per resume
//! point, which locals have slots ([`abi::ResumePoint::slots`]) and which
//! of those hold values ([`abi::ResumePoint::locals`]). A local that is not
//! live needs no value: the code writes it before any read. Resume points
//! whose frames have the same slots form a *save class*; each point unwinds
//! straight to its class's code after the body, so the edge out of the
//! point carries only the values the class saves (a tail shared by all
//! points would make every local live at every point, and temporaries
//! loop-carried). A point may share a class whose slots are more than its
//! live locals, when that saves code (`slots`): its edge sets the locals it
//! does not need to zero first, so their slots hold zero and no dead value
//! is kept alive up to the point. The rewind reads the
//! resume point from the popped frame rather than keeping it in a local
//! through the loops on the way, and restores the numeric locals right
//! before the dispatch of the function's top level, in a case per list of
//! slots, with one call to a *pack* helper (one per count of each numeric type; the
//! slots group them by type). Nothing of the original code runs on the
//! rewind's way from there to the point, so the values arrive unchanged,
//! and they meet the normal path outside every loop, once per call: a
//! second definition of every live local at a join inside a loop body
//! makes Cranelift's allocator move values between stack slots on the
//! loop's hot path. A *temporary*, a local live at the point but not at
//! the header of a loop around it, is loaded again, inline, in the
//! innermost case, so that it is not carried around that loop; except in
//! a *crowded* loop (more than 8 integer or 14 float locals live there),
//! where a join of many spilled values costs more than carrying them.
//! References are restored in the innermost case. A class's code passes
//! its values to a *save* helper, which pushes the frame; a class with a
//! long list of slot types that no other class has stores them inline
//! above the frame stack pointer instead and then pushes the frame, so
//! that no value is live across a call (the control memory keeps room
//! there, [`abi::control::FRAME_HEADROOM`]), and wasmtime compiles no
//! large trampoline for a helper's type.
//!
//! The rewind enters the block levels on the path to the resume point one
//! by one: each level that contains a resume point starts with its own test
//! of the state and a `br_table` to the anchor on the path (see `plan`).
//! A level whose first instruction is a plain `block` holding resume
//! points, with no operands of the level on the stack, has nothing to run
//! before that block, so it leaves its test to the block's level: the inner
//! test's `br_table` covers the outer levels' resume points too, and
//! branches outward to their anchors. clang lowers a C `switch` to one
//! `block` per case, opened back to back before its `br_table`; when the
//! cases call functions that can unwind, this makes one test per nest on
//! every dispatch instead of one per case.
//!
//! A body with levels below its top one is emitted twice: `if state ==
//! REWINDING { body as above } else { body without rewind tests, anchor
//! blocks or dispatch }`. An activation entered in the normal state never
//! sees a rewind in its own body: only the host starts one, with the stack
//! empty, every frame on a rewind's path is entered rewinding, and no
//! original code runs until the rewind has ended. So a call that is not
//! part of a rewind runs none of those tests, nor the cold edges they add
//! into loop bodies, which in small functions called often and in large
//! interpreter loops are most of what instrumentation adds
//! (`docs/PERFORMANCE.md`). The price is code: about a third more than
//! with one copy, and compile time with it. The two copies share the
//! resume points and save classes, so a frame is the same whichever copy
//! unwound it; a frame rewound into the first copy runs there until it
//! returns. The update points are those of the body, in both copies, so
//! the pause bound below holds unchanged.
//!
//! # Two variants
//!
//! The *full variant* is everything above. The *unwind-only variant*
//! ([`Options::unwind_only`]) is each body's normal copy alone, with its
//! update points and save classes and no code that rewinds (nor the
//! allocator exports an update's heap conversion calls, which runs in the
//! new version's instance; it must never be set rewinding, [`abi::State`]):
//! about half the full variant's code, and
//! well under half its compile time (`docs/PERFORMANCE.md`). Both have the
//! same metadata, resume points and frame layout, so a stack the
//! unwind-only variant saved rewinds into an instance of the full one
//! created over the same memories with the same globals. A host runs the
//! unwind-only variant until the first rewind, and only then needs the
//! full one: a program that is never paused never compiles the code that
//! resumes it. The pause bound is the same in both: their update points
//! are.
//!
//! Operands that are on the stack at a resume point live in extra *shadow
//! locals* across it, so the frame saves them after the locals and the
//! rewind pushes them back. Each frame is self-describing with the
//! metadata: the resume point gives its slots' locals and types, and
//! records the original
//! instruction's offset, kind, callee and ordinal, so a frame saved by one
//! version can be matched to the code of another.
//!
//! # Driving it from a host
//!
//! 1. Create the program memory and the control memory (header from
//!    [`abi::control::Header`]), instantiate, call `upstare_init_memory`
//!    (or `upstare_drop_data` over live memory), then `upstare_start` if
//!    exported, then the entry point.
//! 2. To pause: set the pause byte. The guest unwinds at its next update
//!    point; the entry call returns with `upstare_state == 1`. A blocking
//!    import that the host interrupts sets the state to 1 and returns; its
//!    work must count as not done, because the rewind calls it again with
//!    the same arguments. Set the state to 0 and read the frames
//!    ([`abi::read_frames`]).
//! 3. To resume: clear the pause byte, write the frames back if they moved,
//!    set the rewinding byte and the state to 2 ([`abi::State`]), then call
//!    the same entry point again. The guest returns to normal running at the
//!    resume point.

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod abi;
mod analysis;
mod bound;
mod callgraph;
mod error;
pub mod liveness;
mod plan;
mod rewrite;
mod slots;

use std::collections::HashSet;

pub use abi::Metadata;
pub use error::{Error, ErrorKind, Result};

/// Identifies this build of the instrumenter, for caches of its output: a
/// hash of its sources and of [`FINGERPRINTED_CRATES`].
pub const FINGERPRINT: &str = env!("UPSTARE_INSTRUMENT_FINGERPRINT");

/// The crates (`name version source`, `;`-separated) whose locked versions
/// the [`FINGERPRINT`] covers: everything the instrumenter depends on.
/// Empty when built outside the workspace, without its Cargo.lock.
pub const FINGERPRINTED_CRATES: &str = env!("UPSTARE_INSTRUMENT_FINGERPRINTED_CRATES");

/// The `wasi_snapshot_preview1` functions that can block, and so are update
/// points by default.
pub const WASI_BLOCKING: &[&str] =
    &["poll_oneoff", "fd_read", "fd_write", "sock_accept", "sock_recv", "sock_send"];

/// What to instrument.
#[derive(Debug, Clone)]
pub struct Options {
    /// Imports, as (module, name), at which the host may pause the guest.
    pub blocking: HashSet<(String, String)>,
    /// Instrument for stress mode ([`abi::control::Header::stress`]): loop
    /// headers call the pause decision, which counts them down. Without
    /// it a loop header only tests the pause and rewind bytes, with no
    /// call, and the stress byte counts blocking calls alone.
    pub stress: bool,
    /// Instrument the *unwind-only variant*: every body is its normal copy
    /// alone, with its update points and the code that saves frames, and
    /// no code that rewinds (it must never be set rewinding). Its metadata,
    /// resume points and save classes are those of the full variant, so a
    /// stack it unwound rewinds into an instance of the full one over the
    /// same memories. A host runs it until the first rewind, and compiles
    /// the full variant only then (see "Two variants" in the crate docs).
    pub unwind_only: bool,
}

impl Default for Options {
    /// The blocking calls of WASI preview1 ([`WASI_BLOCKING`]) and of the
    /// host's process imports ([`abi::process::BLOCKING`]).
    fn default() -> Self {
        let wasi = WASI_BLOCKING.iter().map(|n| ("wasi_snapshot_preview1", *n));
        let process = abi::process::BLOCKING.iter().map(|n| (abi::IMPORT_MODULE, *n));
        Options {
            blocking: wasi.chain(process).map(|(m, n)| (m.to_string(), n.to_string())).collect(),
            stress: false,
            unwind_only: false,
        }
    }
}

/// An instrumented module and what the host needs to know about it.
#[derive(Debug, Clone)]
pub struct Instrumented {
    /// The output module.
    pub wasm: Vec<u8>,
    /// Its metadata, also stored in the module's `upstare.meta` section.
    pub metadata: Metadata,
}

/// Instruments `wasm`. Invalid or unsupported input is an [`Error`] naming
/// the offset and the reason; the output always validates.
pub fn instrument(wasm: &[u8], options: &Options) -> Result<Instrumented> {
    let (wasm, metadata) = rewrite::module::rewrite(wasm, &options.blocking, options.stress, options.unwind_only)?;
    Ok(Instrumented { wasm, metadata })
}
