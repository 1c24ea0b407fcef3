//! Why an update did not happen, typed so that callers (the supervisor's
//! retries, `--stress-update`'s tally, the control socket's replies, an
//! embedder) match on the step that failed; the words are made once, when
//! the error is printed.

use upstare_patchgen::frames::Unmappable;
use upstare_patchgen::paused::Stale;

use crate::heap_conversion::HeapError;
use crate::module::one_line;
use crate::process::AfterReturnError;
use crate::Exit;

/// Why an update did not happen. In every case the old version runs on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The new module cannot be used at all (unreadable, not wasm, not built
    /// with the documented flags, not instrumentable).
    #[error("{0}")]
    BadInput(String),
    /// The update would not be safe.
    #[error("update refused: {0}")]
    Refused(String),
    /// The running module was loaded without instrumentation: it cannot
    /// pause, so it cannot be updated.
    #[error("update refused: the module runs without instrumentation")]
    NotInstrumented,
    /// A frame cannot move to the new version (yet).
    #[error("update refused: a frame cannot move to the new version: {0}")]
    Frame(Unmappable),
    /// The paused program holds what the update cannot carry over: a
    /// value that would point where nothing will be ([`Stale::Held`]: an
    /// address of a converted global's old copy, or an integer that looks
    /// like one, or of an allocation the heap trace could not type that may
    /// hold a changed struct; the program may let go of it as it runs on),
    /// or a heap it cannot convert.
    #[error("update refused: {0}")]
    Stale(Stale),
    /// Applying the update failed; it was rolled back.
    #[error("update refused: applying it failed and it was rolled back: {0}")]
    RolledBack(#[source] ApplyError),
    /// Something that cannot fail did: a bug in UpStare, not in the
    /// program or its new version. Nothing was changed.
    #[error("internal error (a bug in UpStare, please report it): {0}")]
    Internal(String),
}

/// Which step of applying an update failed, at the pause; the update is
/// rolled back ([`UpdateError::RolledBack`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The guest has no unwinder: it was loaded without instrumentation.
    #[error("the module runs without instrumentation")]
    NotInstrumented,
    /// A worker's link of the new module to its own control memory failed.
    #[error("cannot link the new version: {0}")]
    Link(#[source] wasmtime::Error),
    /// Instantiating the new module failed.
    #[error("cannot instantiate the new version: {}", one_line(.0))]
    Instantiate(#[source] wasmtime::Error),
    /// The running instance does not export a wasm global the plan carries.
    #[error("the running version does not export global {0}")]
    OldGlobalMissing(u32),
    /// The new instance does not export a wasm global the plan carries.
    #[error("the new version does not export global {0}")]
    NewGlobalMissing(u32),
    /// Setting a carried wasm global (or the stack pointer) failed.
    #[error("cannot set global {index} of the new version: {}", one_line(source))]
    SetGlobal {
        /// The global's index in the new module.
        index: u32,
        /// Why.
        #[source]
        source: wasmtime::Error,
    },
    /// The mapped stack moves the stack pointer, and the new version has
    /// no `__stack_pointer` global.
    #[error("the new version has no stack pointer global")]
    NoStackPointer,
    /// The new version's stack pointer global is not exported.
    #[error("the new version does not export its stack pointer")]
    StackPointerNotExported,
    /// Dropping the new instance's passive data segments failed.
    #[error("cannot drop the new version's data segments: {}", one_line(.0))]
    DropData(#[source] wasmtime::Error),
    /// The fresh area, or a write of the new version's data into it, lies
    /// out of bounds.
    #[error("fresh memory at {0:#x} is out of bounds")]
    FreshOutOfBounds(u32),
    /// Memory could not be read to back it up.
    #[error("cannot back up memory before converting state")]
    Backup,
    /// Converting heap objects failed.
    #[error(transparent)]
    Heap(#[from] HeapError),
    /// A converted global's old or new copy lies out of bounds.
    #[error("a converted global lies out of bounds")]
    ConvertedGlobalOutOfBounds,
    /// A frame variable that moves lies out of bounds.
    #[error("a moving frame variable lies out of bounds")]
    MovingVariableOutOfBounds,
    /// A frame variable's new place lies out of bounds.
    #[error("a frame variable's new place lies out of bounds")]
    NewPlaceOutOfBounds,
    /// An address the mapped stack rewrites lies out of bounds.
    #[error("a rewritten address in the stack lies out of bounds")]
    RewrittenAddressOutOfBounds,
    /// A constructor the new version adds failed.
    #[error("constructor `{name}` failed: {}", one_line(source))]
    Constructor {
        /// Its name.
        name: String,
        /// Why (a trap, usually).
        #[source]
        source: wasmtime::Error,
    },
    /// A C transformer does not have the transformer's signature.
    #[error("transformer `{name}` must be `void {name}(const void *old, void *new)`: {}", one_line(source))]
    TransformerSignature {
        /// Its export name.
        name: String,
        /// What wasmtime said of its type.
        #[source]
        source: wasmtime::Error,
    },
    /// A C transformer failed.
    #[error("transformer `{name}` failed: {}", one_line(source))]
    Transformer {
        /// Its export name.
        name: String,
        /// Why (a trap, usually).
        #[source]
        source: wasmtime::Error,
    },
    /// The mapped frames do not fit the control memory.
    #[error("cannot give the new code its frames: {0}")]
    SetFrames(String),
    /// Starting the rewind failed.
    #[error("cannot start the rewind: {}", one_line(.0))]
    StartRewind(#[source] wasmtime::Error),
    /// The new code, rewound into the mapped frames, trapped or exited.
    #[error("the new code did not accept the frames: {}", describe_exit(.0))]
    Rejected(Exit),
    /// The new code, rewound, returned instead of stopping at the resume
    /// point.
    #[error("the new code ran on instead of stopping at the resume point")]
    RanOn,
    /// Reading the frames the new code saved again failed.
    #[error(transparent)]
    Resaved(#[from] AfterReturnError),
    /// The new code saved other frames than it was given; the message
    /// names the first difference.
    #[error("{0}")]
    FramesDisagree(String),
    /// A step failed, and memory could not be put back as it was.
    #[error("{source}; memory could not be restored to its state before the update")]
    NotRestored {
        /// The step's failure.
        source: Box<ApplyError>,
    },
    /// A worker thread could not move; every thread is back in the old
    /// version.
    #[error("thread {tid}: {source}")]
    Thread {
        /// The worker's thread id.
        tid: u32,
        /// Why.
        source: Box<ApplyError>,
    },
    /// Another process of the program could not move; every process is
    /// back in the old version.
    #[error("process {pid}: {source}")]
    Process {
        /// Its pid.
        pid: u32,
        /// Why.
        source: Box<ApplyError>,
    },
}

/// How the rewound new code ended, in a few words.
fn describe_exit(exit: &Exit) -> String {
    match exit {
        Exit::Trap(t) => t.to_string().lines().next().unwrap_or("trap").to_string(),
        Exit::Status(c) => format!("it exited with status {c}"),
        Exit::HostError(e) => e.clone(),
        other => format!("{other:?}"),
    }
}
