//! The guest/host contract of instrumented modules, defined once.
//!
//! Everything a host needs to drive an instrumented module lives here and only
//! here: the import and export names, the states of `upstare_state`, the layout
//! of the control memory header, the layout of a saved frame, and the
//! resume-point metadata section ([`metadata`]). The instrumenter emits code
//! from these constants; the host reads frames and metadata with the same
//! constants and functions. Nothing here depends on an engine.
//!
//! The host must reject a module whose metadata version it does not know:
//! [`Metadata::parse`] does that.

pub mod frame;
pub mod metadata;
pub mod offsets;

pub use frame::{read_frames, write_frames, RawFrame, TypedFrame, Value};
pub use metadata::{
    BlockingImport, DataSegmentMeta, FunctionMeta, GlobalMeta, MemoryMeta, Metadata,
    ResumeKind, ResumePoint,
};

/// Name of the custom section holding the resume-point metadata.
pub const METADATA_SECTION: &str = "upstare.meta";

/// Version of the metadata format (and of this whole ABI). Bumped whenever any
/// constant or layout in this module changes meaning. 6: the futex imports
/// and the resume kind of an atomic wait. 7: frames may have slots for
/// locals dead at their point ([`ResumePoint::slots`]). 8: the control
/// memory keeps [`control::FRAME_HEADROOM`] bytes past the frame stack.
/// 9: the host changes the [`State`] itself (see [`State`]); modules export
/// no functions for it. 10: the instrumenter's functions come before the
/// program's, and the offset map lists every function of the original.
pub const METADATA_VERSION: u32 = 10;

/// Module name of every import the instrumenter adds.
pub const IMPORT_MODULE: &str = "upstare";
/// Import name of the program's linear memory (memory index 0), which the
/// host creates and owns. Always shared, whether or not the original was: a
/// shared memory belongs to the engine, not to a store, so the next version
/// of the program (instantiated in a fresh store) imports the very same
/// memory, without a copy. Same minimum as the original; the maximum is the
/// original's, or [`PROGRAM_MEMORY_MAX_PAGES`] when it had none
/// ([`MemoryMeta::import_max`]). Modules without a memory import a zero-page
/// memory.
pub const MEMORY_IMPORT: &str = "memory";
/// Import name of the control memory (memory index [`control::MEMORY_INDEX`]):
/// a shared memory holding the control header and the frame stack.
pub const CONTROL_IMPORT: &str = "control";
/// Maximum pages of the imported program memory when the original memory
/// declared none: all of wasm32's 4 GiB.
pub const PROGRAM_MEMORY_MAX_PAGES: u32 = 65536;

/// The imports that `memory.atomic.wait32`, `memory.atomic.wait64` and
/// `memory.atomic.notify` become (module [`IMPORT_MODULE`]), present only
/// in modules that use the instruction. Each takes the effective address
/// as an i64 (the instruction's i32 address zero-extended, plus its memarg
/// offset), and the host traps where the instruction would: an address out
/// of bounds of the program memory, or not aligned to the access size. The
/// two waits are update points, kind [`ResumeKind::AtomicWait`]: a thread
/// interrupted there unwinds, and the rewind waits again (a futex wait may
/// wake spuriously, so the program copes).
pub mod futex {
    /// `(addr: i64, expected: i32, timeout_ns: i64) -> i32`: waits while
    /// the i32 at `addr` equals `expected`, for at most `timeout_ns`
    /// nanoseconds (negative: forever). Returns 0 (woken by a notify),
    /// 1 (the value differed) or 2 (timed out), as the instruction does.
    pub const WAIT32: &str = "atomic_wait32";
    /// `(addr: i64, expected: i64, timeout_ns: i64) -> i32`: [`WAIT32`] on
    /// an i64.
    pub const WAIT64: &str = "atomic_wait64";
    /// `(addr: i64, count: i32) -> i32`: wakes at most `count` (unsigned)
    /// threads waiting at `addr`; returns how many it woke.
    pub const NOTIFY: &str = "atomic_notify";
}

/// The process imports a guest declares itself (module [`IMPORT_MODULE`],
/// through `upstare.h`): a multi-process program's `fork`, `waitpid`,
/// `getpid`, `getppid` and `kill`. [`process::FORK`] and
/// [`process::WAITPID`] are blocking calls, update points like WASI's: the
/// host makes a fork at the unwind it asks for there, and a wait is
/// interrupted by a pause; the rewind calls each again.
pub mod process {
    /// `() -> i32`: the child's pid in the parent, 0 in the child, or a
    /// negative errno.
    pub const FORK: &str = "fork";
    /// `(pid: i32, status: i32, options: i32) -> i32`: waits for a child
    /// (`pid` -1: any) to end, writes its status (an i32) at `status`
    /// unless 0; the child's pid, 0 with `WNOHANG` and none ended, or a
    /// negative errno.
    pub const WAITPID: &str = "waitpid";
    /// `() -> i32`: the calling process's pid.
    pub const GETPID: &str = "getpid";
    /// `() -> i32`: its parent's pid (1's parent is 0).
    pub const GETPPID: &str = "getppid";
    /// `(pid: i32, signal: i32) -> i32`: ends process `pid` as `signal`
    /// (`SIGTERM` or `SIGKILL`; 0 only checks it exists); 0 or a negative
    /// errno.
    pub const KILL: &str = "kill";
    /// The ones that block.
    pub const BLOCKING: &[&str] = &[FORK, WAITPID];
    /// All of them: a module may import these from [`super::IMPORT_MODULE`]
    /// before it is instrumented.
    pub const ALL: &[&str] = &[FORK, WAITPID, GETPID, GETPPID, KILL];
}

/// The mark of a module relinked against a running program's layout
/// (patchgen's relinker places its data and functions where the running
/// version has room): its own `linking` section no longer says where its
/// data is, so such a module is not relinked again.
pub mod relinked {
    /// The custom section, empty, that marks a relinked module.
    pub const SECTION: &str = "upstare.relinked";

    /// Appends the mark to a module's bytes.
    pub fn mark(wasm: &mut Vec<u8>) {
        use wasm_encoder::Encode;
        wasm.push(0);
        wasm_encoder::CustomSection { name: SECTION.into(), data: (&[][..]).into() }.encode(wasm);
    }

    /// Whether `wasm` carries the mark.
    pub fn is_marked(wasm: &[u8]) -> bool {
        wasmparser::Parser::new(0)
            .parse_all(wasm)
            .any(|p| matches!(p, Ok(wasmparser::Payload::CustomSection(c)) if c.name() == SECTION))
    }
}

/// Names of the exports the instrumenter adds.
pub mod exports {
    /// Mutable i32 global holding the current [`super::State`].
    pub const STATE: &str = "upstare_state";
    /// `() -> ()`: applies the data segments that were active in the original
    /// module (in their original order, at their original offsets) and drops
    /// them. Call once on a fresh memory, before anything else.
    pub const INIT_MEMORY: &str = "upstare_init_memory";
    /// `() -> ()`: drops those data segments without applying them, for an
    /// instance created over memory that is already initialised (an update).
    pub const DROP_DATA: &str = "upstare_drop_data";
    /// The original start function (present only if the module had a start
    /// section). The host calls it after [`INIT_MEMORY`].
    pub const START: &str = "upstare_start";
    /// Table of funcref values saved in frames (present only if some frame can
    /// hold a funcref). A frame slot of type funcref holds an index into it.
    pub const FUNCREF_TABLE: &str = "upstare_funcrefs";
    /// Table of externref values saved in frames, like [`FUNCREF_TABLE`].
    pub const EXTERNREF_TABLE: &str = "upstare_externrefs";
    /// The program's `malloc` (found by its name), exported as it is: the
    /// host reallocates heap objects whose type an update changes through
    /// it. wasm-ld wraps a command's own exports in code that flushes stdio,
    /// which must not run during a pause, so the program's `malloc` export
    /// (if any) will not do.
    pub const MALLOC: &str = "upstare_malloc";
    /// The program's `free`, like [`MALLOC`].
    pub const FREE: &str = "upstare_free";
    /// `(at, n) -> done`, present with [`MALLOC`]: calls `malloc` for each
    /// of the `n` sizes (u32) at `at` in the control memory, replacing each
    /// with the address returned, and returns how many it allocated; it
    /// stops early at a null or when the state leaves normal. One call for
    /// a batch instead of one per object.
    pub const MALLOC_BATCH: &str = "upstare_malloc_batch";
    /// `(at, n) -> done`, present with [`FREE`]: calls `free` for each of
    /// the `n` addresses at `at` in the control memory, like
    /// [`MALLOC_BATCH`].
    pub const FREE_BATCH: &str = "upstare_free_batch";
    /// Prefix of the export of each mutable global: `upstare_global_<index>`.
    pub const GLOBAL_PREFIX: &str = "upstare_global_";

    /// The export name of the mutable global with this index.
    pub fn global(index: u32) -> String {
        format!("{GLOBAL_PREFIX}{index}")
    }

    /// Whether a module's own export would collide with a name the
    /// instrumenter adds. Other `upstare_` names are the program's (the
    /// state transformers of `upstare.h`, for one).
    pub fn is_reserved(name: &str) -> bool {
        [
            STATE,
            INIT_MEMORY,
            DROP_DATA,
            START,
            FUNCREF_TABLE,
            EXTERNREF_TABLE,
            MALLOC,
            FREE,
            MALLOC_BATCH,
            FREE_BATCH,
        ]
        .contains(&name)
            || name.starts_with(GLOBAL_PREFIX)
    }
}

/// Values of the `upstare_state` global.
///
/// The guest moves from normal to unwinding at an update point that
/// pauses, and from rewinding to normal at the resume point it re-enters.
/// The host makes the other moves, between calls into the instance, by
/// setting the global (and the control header, [`control`]):
///
/// - a blocking import the host interrupts sets unwinding and returns; its
///   work must count as not done, because the rewind calls it again with
///   the same arguments;
/// - once the entry call returned unwinding, the host sets normal and reads
///   the frames;
/// - to rewind, it sets the rewinding byte and rewinding, then calls the
///   same entry point again;
/// - to abandon a rewind, it sets normal, clears the rewinding byte, sets
///   the frame stack pointer to [`control::FRAMES_BASE`] and the side-table
///   count to zero, and fills the side tables ([`exports::FUNCREF_TABLE`],
///   [`exports::EXTERNREF_TABLE`]) with nulls.
///
/// Only the full variant may be set rewinding: the unwind-only variant
/// has no code that rewinds, and would run its bodies from the top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Running normally.
    Normal = 0,
    /// Saving frames and returning from every function up to the export.
    Unwinding = 1,
    /// Re-entering the saved frames, outermost first, up to the resume point.
    Rewinding = 2,
}

/// Layout of the control memory header.
///
/// ```text
/// offset  size  written by  meaning
///  0      1     host        pause requested (nonzero: unwind at the next update point)
///  1      1     guest/host  rewinding (set by the host to rewind, cleared when done)
///  2      1     host        stress mode (nonzero: count update points, see below)
///  3      1     -           reserved, zero
///  4      4     guest/host  frame stack pointer: address of the first free byte
///  8      4     guest/host  stress countdown: update points left before the next forced unwind
/// 12      4     host        stress period N: countdown reload value
/// 16      4     guest       next free slot in the reference side tables
/// 20..64        -           reserved, zero
/// 64            guest       frame stack, growing upwards
/// ```
///
/// The memory always extends at least [`control::FRAME_HEADROOM`] bytes past
/// the frame stack pointer: a save class stores a frame's slots above the
/// pointer first, then pushes the frame (which grows the memory for the
/// next one), so that no saved value is live across a call. Whoever sets
/// the pointer keeps that room: the guest's push, and the host when it
/// creates the memory or writes frames in.
///
/// Bytes 0..2 (pause and rewind) form one little-endian half-word that every
/// loop header loads; the stress variant's loop headers, and the checks
/// before blocking and indirect calls, load the whole word 0..4. It is zero on
/// the hot path, so the check costs one load and one branch. Each of those
/// bytes has a single writer at a time, so a host thread may store the
/// pause byte (with an atomic byte store) while the guest runs.
///
/// Stress mode: with the stress byte set, each update point reached (loop
/// header, or a blocking import call before it is made) decrements the
/// countdown; when it reaches zero it is reloaded from the period and the
/// guest unwinds there. Period 1 unwinds at every update point. Loop headers
/// count only in a module instrumented as the stress variant
/// (`Options::stress`); in the other they ignore the stress byte.
pub mod control {
    /// Memory index of the control memory in an instrumented module.
    pub const MEMORY_INDEX: u32 = 1;
    /// Minimum pages the instrumented module declares for the control memory.
    pub const MIN_PAGES: u64 = 1;
    /// Maximum pages it declares (the host may create a smaller maximum).
    pub const MAX_PAGES: u64 = 65536;
    /// The flag word (bytes 0..4).
    pub const FLAGS: u32 = 0;
    /// Pause-requested byte.
    pub const PAUSE_BYTE: u32 = 0;
    /// Rewinding byte.
    pub const REWIND_BYTE: u32 = 1;
    /// Stress-mode byte.
    pub const STRESS_BYTE: u32 = 2;
    /// Checked-rewind byte: while it is set, a rewind that lands on a loop
    /// header stops there again (when a pause is requested) instead of
    /// running the loop on. The host sets it only to verify that new code
    /// accepts its frames; an ordinary resume runs on from the header, so
    /// a guest paused again at once still makes progress.
    pub const VERIFY_BYTE: u32 = 3;
    /// Frame stack pointer (u32).
    pub const FRAME_SP: u32 = 4;
    /// Bytes the memory always holds past the frame stack pointer (see
    /// above). A frame larger than this grows the memory before its stores.
    pub const FRAME_HEADROOM: u32 = 32 << 10;
    /// Stress countdown (u32).
    pub const STRESS_COUNTDOWN: u32 = 8;
    /// Stress period (u32).
    pub const STRESS_PERIOD: u32 = 12;
    /// Next free reference side-table slot (u32).
    pub const REF_TOP: u32 = 16;
    /// Size of the header; the frame stack starts here.
    pub const HEADER_SIZE: u32 = 64;
    /// Address of the first frame.
    pub const FRAMES_BASE: u32 = HEADER_SIZE;
    const _: () = assert!((FRAMES_BASE + FRAME_HEADROOM) as u64 <= MIN_PAGES << 16, "a new control memory has the headroom");

    /// The control header as plain values, for hosts and tests that copy it
    /// in or out.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Header {
        /// Pause requested.
        pub pause: bool,
        /// Rewinding.
        pub rewinding: bool,
        /// Stress mode on.
        pub stress: bool,
        /// A checked rewind is under way.
        pub verify: bool,
        /// Frame stack pointer.
        pub frame_sp: u32,
        /// Stress countdown.
        pub stress_countdown: u32,
        /// Stress period.
        pub stress_period: u32,
        /// Next free reference side-table slot.
        pub ref_top: u32,
    }

    impl Default for Header {
        /// A fresh header: nothing requested, empty frame stack.
        fn default() -> Self {
            Header {
                pause: false,
                rewinding: false,
                stress: false,
                verify: false,
                frame_sp: FRAMES_BASE,
                stress_countdown: 0,
                stress_period: 0,
                ref_top: 0,
            }
        }
    }

    impl Header {
        /// A fresh header in stress mode: every `period`-th update point unwinds.
        pub fn stress(period: u32) -> Self {
            Header {
                stress: true,
                stress_countdown: period,
                stress_period: period,
                ..Header::default()
            }
        }

        /// The header's bytes, to be written at offset 0 of the control memory.
        pub fn encode(&self) -> [u8; HEADER_SIZE as usize] {
            let mut out = [0u8; HEADER_SIZE as usize];
            out[PAUSE_BYTE as usize] = self.pause as u8;
            out[REWIND_BYTE as usize] = self.rewinding as u8;
            out[STRESS_BYTE as usize] = self.stress as u8;
            out[VERIFY_BYTE as usize] = self.verify as u8;
            let mut put = |at: u32, v: u32| {
                out[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes())
            };
            put(FRAME_SP, self.frame_sp);
            put(STRESS_COUNTDOWN, self.stress_countdown);
            put(STRESS_PERIOD, self.stress_period);
            put(REF_TOP, self.ref_top);
            out
        }

        /// Reads a header from the first [`HEADER_SIZE`] bytes of `bytes`;
        /// `None` if `bytes` is shorter.
        pub fn decode(bytes: &[u8]) -> Option<Self> {
            if bytes.len() < HEADER_SIZE as usize {
                return None;
            }
            let get = |at: u32| {
                let at = at as usize;
                u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            };
            Some(Header {
                pause: bytes[PAUSE_BYTE as usize] != 0,
                rewinding: bytes[REWIND_BYTE as usize] != 0,
                stress: bytes[STRESS_BYTE as usize] != 0,
                verify: bytes[VERIFY_BYTE as usize] != 0,
                frame_sp: get(FRAME_SP),
                stress_countdown: get(STRESS_COUNTDOWN),
                stress_period: get(STRESS_PERIOD),
                ref_top: get(REF_TOP),
            })
        }
    }
}

/// The value types a frame slot can hold, with their wasm binary codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValType {
    /// `i32`
    I32,
    /// `i64`
    I64,
    /// `f32`
    F32,
    /// `f64`
    F64,
    /// `funcref`: the slot holds an index into [`exports::FUNCREF_TABLE`].
    FuncRef,
    /// `externref`: the slot holds an index into [`exports::EXTERNREF_TABLE`].
    ExternRef,
}

impl ValType {
    /// The type's code in the wasm binary format.
    pub fn code(self) -> u8 {
        match self {
            ValType::I32 => 0x7f,
            ValType::I64 => 0x7e,
            ValType::F32 => 0x7d,
            ValType::F64 => 0x7c,
            ValType::FuncRef => 0x70,
            ValType::ExternRef => 0x6f,
        }
    }

    /// The type with this wasm binary code, if a frame can hold it.
    pub fn from_code(code: u8) -> Option<ValType> {
        Some(match code {
            0x7f => ValType::I32,
            0x7e => ValType::I64,
            0x7d => ValType::F32,
            0x7c => ValType::F64,
            0x70 => ValType::FuncRef,
            0x6f => ValType::ExternRef,
            _ => return None,
        })
    }

    /// Whether values of this type live in a side table rather than the slot.
    pub fn is_ref(self) -> bool {
        matches!(self, ValType::FuncRef | ValType::ExternRef)
    }
}
