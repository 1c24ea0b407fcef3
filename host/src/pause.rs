//! Pausing an instrumented guest: the control memory the guest shares with
//! the host, pause requests from other threads, and reading the frames the
//! guest saved when it unwound.
//!
//! The protocol is the instrumenter's (`upstare_instrument::abi`): the host
//! sets the pause byte of the control header and wakes any blocking call;
//! the guest unwinds at its next update point and its entry call returns
//! with `upstare_state == UNWINDING`. The frames are then in the control
//! memory, readable here, until the host rewinds.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::time::Instant;

use upstare_instrument::abi::{self, control, RawFrame};
use wasmtime::{Engine, MemoryType, SharedMemory};

use crate::interrupt::InterruptHandle;
use crate::processes::Processes;
use crate::threads::Threads;
use std::sync::Arc;

/// Pages the host gives the control memory at most: 256 MiB of frames,
/// about a million frames of C code. The module declares more; a smaller
/// maximum only bounds the reservation.
const CONTROL_MAX_PAGES: u32 = 4096;

/// The control memory of one guest instance.
#[derive(Clone)]
pub struct ControlMemory {
    memory: SharedMemory,
    /// A request to pause only where the guest blocks in a call
    /// ([`PauseHandle::request_at_blocking_call`]). The host's alone: the
    /// guest's update points read the pause byte, which such a request
    /// leaves clear, and the interrupt that comes with it unwinds the
    /// guest at its next blocking call, where the host then stops it.
    blocking_pause: Arc<AtomicBool>,
}

impl std::fmt::Debug for ControlMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMemory").finish_non_exhaustive()
    }
}

impl ControlMemory {
    /// A control memory holding `header`, with the room the guest stores a
    /// frame in past its frame stack pointer ([`control::FRAME_HEADROOM`]).
    pub fn new(engine: &Engine, header: control::Header) -> anyhow::Result<Self> {
        let ty = MemoryType::shared(control::MIN_PAGES as u32, CONTROL_MAX_PAGES);
        let memory = SharedMemory::new(engine, ty)?;
        let control = ControlMemory { memory, blocking_pause: Arc::default() };
        control.grow_to(header.frame_sp as usize + control::FRAME_HEADROOM as usize)?;
        control.write_bytes(0, &header.encode());
        Ok(control)
    }

    /// The memory, to be imported as `upstare.control`.
    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    fn byte(&self, at: u32) -> &AtomicU8 {
        let cell = &self.memory.data()[at as usize];
        // SAFETY: the cell lies in the shared memory, which lives as long as
        // `self.memory`; every access to the header from the host goes
        // through atomics, and the guest's plain loads and stores of these
        // bytes are racy only in the sense wasm threads allow.
        unsafe { AtomicU8::from_ptr(cell.get()) }
    }

    fn word(&self, at: u32) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4));
        let cell = &self.memory.data()[at as usize];
        // SAFETY: as in `byte`; `at` is 4-aligned within the page-aligned
        // memory, which is what `AtomicU32` needs.
        unsafe { AtomicU32::from_ptr(cell.get().cast()) }
    }

    /// The `n` words from `at` (4-aligned). The memory is looked up once:
    /// wasmtime takes a lock to tell a shared memory's length, and the
    /// allocator's batches pass a million words.
    fn words(&self, at: u32, n: usize) -> impl Iterator<Item = &AtomicU32> {
        debug_assert!(at.is_multiple_of(4));
        let cells = &self.memory.data()[at as usize..at as usize + 4 * n];
        // SAFETY: as in `word`, for each word.
        cells.chunks_exact(4).map(|cell| unsafe { AtomicU32::from_ptr(cell[0].get().cast()) })
    }

    /// Sets or clears the pause request.
    pub fn set_pause(&self, on: bool) {
        self.byte(control::PAUSE_BYTE).store(on as u8, Ordering::SeqCst);
    }

    /// Sets or clears the checked-rewind byte (see
    /// [`control::VERIFY_BYTE`]).
    pub fn set_verify(&self, on: bool) {
        self.byte(control::VERIFY_BYTE).store(on as u8, Ordering::SeqCst);
    }

    /// Ends stress mode: no more update points are counted.
    pub fn stop_stress(&self) {
        self.byte(control::STRESS_BYTE).store(0, Ordering::SeqCst);
    }

    /// Sets or clears the rewinding byte.
    pub(crate) fn set_rewinding(&self, on: bool) {
        self.byte(control::REWIND_BYTE).store(on as u8, Ordering::SeqCst);
    }

    /// Empties the frame stack and the reference side tables' count. Call
    /// only while the guest is not running.
    pub(crate) fn clear_frames(&self) {
        self.word(control::FRAME_SP).store(control::FRAMES_BASE, Ordering::SeqCst);
        self.word(control::REF_TOP).store(0, Ordering::SeqCst);
    }

    /// Whether a pause was requested, clearing the request: it is served.
    pub fn take_pause(&self) -> bool {
        self.byte(control::PAUSE_BYTE).swap(0, Ordering::SeqCst) != 0
    }

    /// Sets or clears the request to pause at a blocking call only.
    pub fn set_blocking_pause(&self, on: bool) {
        self.blocking_pause.store(on, Ordering::SeqCst);
    }

    /// Whether a pause at a blocking call only is requested.
    pub fn blocking_pause_requested(&self) -> bool {
        self.blocking_pause.load(Ordering::SeqCst)
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.byte(control::PAUSE_BYTE).load(Ordering::SeqCst) != 0
    }

    /// The frames the guest saved, innermost first. Call only while the
    /// guest is not running.
    pub fn frames(&self) -> Result<Vec<RawFrame>, upstare_instrument::Error> {
        let sp = self.word(control::FRAME_SP).load(Ordering::SeqCst);
        let len = (sp as usize).min(self.memory.data().len());
        let mut bytes = vec![0u8; len];
        self.read_bytes(0, &mut bytes);
        abi::read_frames(&bytes)
    }

    /// The frame stack's bytes, innermost frame first. Call only while the
    /// guest is not running.
    pub fn frame_bytes(&self) -> Vec<u8> {
        let sp = self.word(control::FRAME_SP).load(Ordering::SeqCst) as usize;
        let base = control::FRAMES_BASE as usize;
        let end = sp.clamp(base, self.memory.data().len());
        let mut bytes = vec![0u8; end - base];
        self.read_bytes(control::FRAMES_BASE, &mut bytes);
        bytes
    }

    /// Replaces the frame stack, growing the memory if needed to hold it
    /// and the room past it that the guest stores its next frame in. Call
    /// only while the guest is not running.
    pub fn set_frames(&self, frames: &[u8]) -> Result<(), String> {
        let end = control::FRAMES_BASE as usize + frames.len();
        self.grow_to(end + control::FRAME_HEADROOM as usize).map_err(|e| format!("cannot grow the frame stack: {e}"))?;
        self.write_bytes(control::FRAMES_BASE, frames);
        self.word(control::FRAME_SP).store(end as u32, Ordering::SeqCst);
        Ok(())
    }

    /// The address of a scratch array of `words` u32 just above the frame
    /// stack, growing the memory if needed, for the allocator's batches
    /// ([`abi::exports::MALLOC_BATCH`]). Call only while the guest is not
    /// running; the frames below stay as they are.
    pub(crate) fn scratch(&self, words: usize) -> Result<u32, String> {
        let sp = self.word(control::FRAME_SP).load(Ordering::SeqCst) as usize;
        let at = sp.max(control::FRAMES_BASE as usize).next_multiple_of(8);
        self.grow_to(at + 4 * words).map_err(|e| format!("cannot grow the control memory: {e}"))?;
        u32::try_from(at).map_err(|_| "the frame stack fills the control memory".to_string())
    }

    /// Grows the memory to hold at least `end` bytes.
    fn grow_to(&self, end: usize) -> anyhow::Result<()> {
        let have = self.memory.data().len();
        if end > have {
            self.memory.grow((end - have).div_ceil(64 << 10) as u64)?;
        }
        Ok(())
    }

    /// Writes `words` at `at` (4-aligned). Call only while the guest is not
    /// running.
    pub(crate) fn write_words(&self, at: u32, words: &[u32]) {
        for (cell, w) in self.words(at, words.len()).zip(words) {
            cell.store(*w, Ordering::Relaxed);
        }
    }

    /// Reads `out.len()` words at `at` (4-aligned). Call only while the
    /// guest is not running.
    pub(crate) fn read_words(&self, at: u32, out: &mut [u32]) {
        for (cell, w) in self.words(at, out.len()).zip(out) {
            *w = cell.load(Ordering::Relaxed);
        }
    }

    fn read_bytes(&self, at: u32, out: &mut [u8]) {
        let data = self.memory.data();
        let src = &data[at as usize..at as usize + out.len()];
        for (o, cell) in out.iter_mut().zip(src) {
            // SAFETY: the cell is in bounds (sliced above); a byte read races
            // with the guest at most on the header, which is benign.
            *o = unsafe { std::ptr::read_volatile(cell.get()) };
        }
    }

    fn write_bytes(&self, at: u32, bytes: &[u8]) {
        let data = self.memory.data();
        let dst = &data[at as usize..at as usize + bytes.len()];
        for (cell, b) in dst.iter().zip(bytes) {
            // SAFETY: in bounds (sliced above); the host writes only while the
            // guest is not running, or before it starts.
            unsafe { std::ptr::write_volatile(cell.get(), *b) };
        }
    }
}

/// A cloneable, `Send` handle that asks a guest to pause at its next update
/// point.
#[derive(Debug, Clone)]
pub struct PauseHandle {
    control: ControlMemory,
    interrupt: InterruptHandle,
    /// The program's other threads, which pause with the main one.
    threads: Option<Arc<Threads>>,
    /// The program's other processes, which pause with the first.
    processes: Option<Arc<Processes>>,
}

impl PauseHandle {
    pub(crate) fn new(control: ControlMemory, interrupt: InterruptHandle, threads: Option<Arc<Threads>>, processes: Option<Arc<Processes>>) -> Self {
        PauseHandle { control, interrupt, threads, processes }
    }

    /// Asks the guest to pause: it unwinds at its next loop header or
    /// blocking call, and [`crate::Guest::run`] returns
    /// [`crate::Exit::Paused`]. Returns when the request is posted, not when
    /// the guest has paused.
    pub fn request(&self) -> Instant {
        let asked = Instant::now();
        if let Some(threads) = &self.threads {
            threads.request_pause();
        }
        if let Some(processes) = &self.processes {
            processes.request_pause();
        }
        self.control.set_pause(true);
        self.interrupt.interrupt();
        asked
    }

    /// Whether the guest holds no saved frames: true while it runs normally,
    /// false from an unwind until a rewind has popped its last frame. Lets
    /// an observer on another thread see a resume complete.
    pub fn frame_stack_empty(&self) -> bool {
        self.control.word(control::FRAME_SP).load(Ordering::SeqCst) == control::FRAMES_BASE
    }

    /// Withdraws a request the guest has not acted on yet.
    pub fn cancel(&self) {
        self.control.set_pause(false);
        self.control.set_blocking_pause(false);
        self.interrupt.withdraw();
        if let Some(threads) = &self.threads {
            threads.cancel_pause();
        }
        if let Some(processes) = &self.processes {
            processes.cancel_pause();
        }
    }

    /// Asks the guest to pause at its next blocking call only, where a
    /// frame that cannot move as it stands may go back to its loop header;
    /// loop headers and calls elsewhere run on.
    pub fn request_at_blocking_call(&self) -> Instant {
        let asked = Instant::now();
        self.control.set_blocking_pause(true);
        self.interrupt.interrupt();
        asked
    }
}
