//! A paused guest's state as a value and as bytes: linear memory, mutable
//! globals, the frames of its stack and its fd table; the file format;
//! capturing it ([`Guest::snapshot`]) and resuming it in a new instance, in
//! this process or another ([`Guest::restore`]).
//!
//! File format, version [`FORMAT_VERSION`], all integers little-endian:
//!
//! ```text
//! magic      16 bytes  "UPSTARE SNAPSHOT"
//! version    u32
//! module     32 bytes  SHA-256 of the original module the snapshot belongs to
//! original   u64 length, bytes: that module, so a snapshot file is all a restore needs
//! args       u32 count, then per argument: u32 length, UTF-8 bytes
//! env        u32 count, then per variable: name and value as args are
//! fds        u32 count, then per fd: fd u32, flags u16, kind u8 and its fields:
//!              0 std: index u8            1 preopen: name str, host path str
//!              2 dir: path str            3 file: path str, offset u64, readable u8, writable u8
//!              4 listener: address str    5 connected socket
//!              6 shared: pid u32, fd u32 (the object of that fd of a
//!                process recorded before)
//!            (str: u32 length, UTF-8 bytes)
//! globals    u32 count, then per global: index u32, type u8 (wasm code), bits u64
//! memory     u64 length, bytes
//! frames     u64 length, bytes (the frame stack, as in upstare_instrument::abi::frame)
//! threads    u32 count, then per thread besides the main one (wasi-threads):
//!              tid u32, arg u32 (its `wasi_thread_start` argument),
//!              globals as above, frames as above
//! processes  u32 count, then per process besides the first (a program
//!            that forks), in pid order: pid u32, parent u32, ended u8;
//!            if ended (a zombie): its wait status i32; else fds, globals,
//!            memory and frames as above
//! layout     32 bytes  SHA-256 of the instrumented module's metadata section
//!            (`upstare_instrument::abi::METADATA_SECTION`): what the frames mean
//! checksum   32 bytes  SHA-256 of everything before it
//! ```
//!
//! Version 1 had no threads section; it is read as a program of one
//! thread. Version 2 had no processes section; it is read as a program of
//! one process. Version 3 had no layout; it is read, but not resumed.
//!
//! A snapshot names its module by hash: it can only be resumed by the same
//! build, because the frames refer to its functions and resume points. And
//! only by a host whose instrumenter describes that build's frames the same
//! way (the layout): another version may save other locals at other points,
//! and would read the frames' slots as the wrong values.
//! The fd table is described, not copied: see [`crate::wasi::persist`] for
//! how each kind of fd is opened again.

use sha2::{Digest, Sha256};
use upstare_instrument::abi::{self, exports, TypedFrame, ValType};

use wasmtime::{Engine, Val};

use crate::cache::hex;
use crate::module::{one_line, GuestModule};
use crate::process::{Guest, GuestConfig};
use crate::pause_group::lock;
use crate::wasi::persist::{self, Described, FdKind, FdRecord};

/// The first 16 bytes of every snapshot file.
pub const MAGIC: &[u8; 16] = b"UPSTARE SNAPSHOT";
/// The version of the format this host reads and writes.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format version this host still reads.
const OLDEST_VERSION: u32 = 1;

/// A paused guest's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// SHA-256 of the original module.
    pub module_hash: [u8; 32],
    /// The original module (as built, before instrumentation).
    pub module: Vec<u8>,
    /// The guest's `argv`.
    pub args: Vec<String>,
    /// The guest's environment.
    pub env: Vec<(String, String)>,
    /// The guest's fd table.
    pub fds: Vec<FdRecord>,
    /// Mutable globals: index, type, raw bits.
    pub globals: Vec<(u32, ValType, u64)>,
    /// The program memory.
    pub memory: Vec<u8>,
    /// The frame stack, innermost frame first.
    pub frames: Vec<u8>,
    /// The program's other threads, each paused at an update point.
    pub threads: Vec<ThreadSnapshot>,
    /// The program's other processes, if it forks, in pid order.
    pub processes: Vec<ProcessSnapshot>,
    /// What the frames mean: the [`frames_layout`] of the instrumented
    /// module that saved them; `None` in a snapshot of format 3 or before.
    pub frames_layout: Option<[u8; 32]>,
}

/// The SHA-256 of an instrumented module's metadata section, which says
/// which locals and operands every frame's slots hold: two hosts whose
/// instrumenters give a module the same layout read its frames alike.
/// `None` when `wasm` has no such section. (Hashing the section as it
/// stands costs a tenth of encoding the parsed metadata again: about
/// 0.2 ms for SQLite's, at every load.)
pub fn frames_layout(wasm: &[u8]) -> Option<[u8; 32]> {
    wasmparser::Parser::new(0).parse_all(wasm).find_map(|payload| match payload {
        Ok(wasmparser::Payload::CustomSection(c)) if c.name() == abi::METADATA_SECTION => Some(Sha256::digest(c.data()).into()),
        _ => None,
    })
}

/// The first bytes of a layout, as errors show it.
fn short(layout: &[u8; 32]) -> String {
    hex(&layout[..6])
}

/// A process of a program that forks, besides its first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSnapshot {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid (0: it passed to the host).
    pub parent: u32,
    /// Its wait status, if it has ended and was not waited for yet; it has
    /// no state then.
    pub ended: Option<i32>,
    /// Its fd table.
    pub fds: Vec<FdRecord>,
    /// Its mutable globals.
    pub globals: Vec<(u32, ValType, u64)>,
    /// Its memory.
    pub memory: Vec<u8>,
    /// Its frame stack, innermost frame first.
    pub frames: Vec<u8>,
}

/// A paused thread of a multi-threaded program, besides its main one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSnapshot {
    /// Its wasi-threads id.
    pub tid: u32,
    /// The argument it was started with (`wasi_thread_start(tid, arg)`).
    pub arg: u32,
    /// Its instance's mutable globals (its stack pointer, its TLS base).
    pub globals: Vec<(u32, ValType, u64)>,
    /// Its frame stack, innermost frame first.
    pub frames: Vec<u8>,
}

/// Why a snapshot could not be taken, read or resumed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bytes are not a snapshot.
    #[error("not an upstare snapshot (bad magic number)")]
    NotASnapshot,
    /// Written by another version of the format.
    #[error("snapshot format version {found}; this host reads versions {OLDEST_VERSION} to {FORMAT_VERSION}")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// Truncated, or damaged.
    #[error("the snapshot is damaged: {0}")]
    Corrupt(&'static str),
    /// Belongs to another module.
    #[error("the snapshot belongs to another module (its SHA-256 is {snapshot}, this module's is {module})")]
    WrongModule {
        /// Hash in the snapshot.
        snapshot: String,
        /// Hash of the module given.
        module: String,
    },
    /// Its frames were saved by an instrumenter that laid them out
    /// otherwise, or by a host that did not record the layout.
    #[error("the snapshot's frames were saved by another version of UpStare ({saved}; this host's layout is {here}): resume it with the version that took it")]
    OtherLayout {
        /// The layout in the snapshot, or why there is none.
        saved: String,
        /// This host's layout for the module.
        here: String,
    },
    /// The guest is not in a state that can be captured or resumed.
    #[error("{0}")]
    State(String),
}

impl Snapshot {
    /// The module hash as hex.
    pub fn module_hash_hex(&self) -> String {
        hex(&self.module_hash)
    }

    /// Checks that the snapshot belongs to `module`, and that this host
    /// instruments it so that the frames mean what they meant.
    pub fn check_module(&self, module: &GuestModule) -> Result<(), SnapshotError> {
        if module.hash != self.module_hash {
            return Err(SnapshotError::WrongModule { snapshot: hex(&self.module_hash), module: module.hash_hex() });
        }
        match (self.frames_layout, module.frames_layout) {
            (Some(saved), Some(here)) if saved == here => Ok(()),
            (_, None) => Err(SnapshotError::State("a module loaded without instrumentation cannot resume a snapshot".into())),
            (saved, Some(here)) => Err(SnapshotError::OtherLayout {
                saved: saved.map_or_else(|| "format 3 or before, which did not record the layout".into(), |l| format!("layout {}", short(&l))),
                here: short(&here),
            }),
        }
    }

    /// The file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.memory.len() + self.frames.len() + 256);
        out.extend_from_slice(MAGIC);
        // A snapshot decoded from format 3 or before, which has no layout,
        // is written as format 3 again: it keeps saying so.
        let version = if self.frames_layout.is_some() { FORMAT_VERSION } else { 3 };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&self.module_hash);
        out.extend_from_slice(&(self.module.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.module);
        let string = encode_string;
        out.extend_from_slice(&(self.args.len() as u32).to_le_bytes());
        for a in &self.args {
            string(&mut out, a);
        }
        out.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        for (k, v) in &self.env {
            string(&mut out, k);
            string(&mut out, v);
        }
        encode_fds(&mut out, &self.fds);
        encode_globals(&mut out, &self.globals);
        for blob in [&self.memory, &self.frames] {
            encode_blob(&mut out, blob);
        }
        out.extend_from_slice(&(self.threads.len() as u32).to_le_bytes());
        for t in &self.threads {
            out.extend_from_slice(&t.tid.to_le_bytes());
            out.extend_from_slice(&t.arg.to_le_bytes());
            encode_globals(&mut out, &t.globals);
            encode_blob(&mut out, &t.frames);
        }
        out.extend_from_slice(&(self.processes.len() as u32).to_le_bytes());
        for p in &self.processes {
            out.extend_from_slice(&p.pid.to_le_bytes());
            out.extend_from_slice(&p.parent.to_le_bytes());
            match p.ended {
                Some(status) => {
                    out.push(1);
                    out.extend_from_slice(&status.to_le_bytes());
                }
                None => {
                    out.push(0);
                    encode_fds(&mut out, &p.fds);
                    encode_globals(&mut out, &p.globals);
                    encode_blob(&mut out, &p.memory);
                    encode_blob(&mut out, &p.frames);
                }
            }
        }
        if let Some(layout) = &self.frames_layout {
            out.extend_from_slice(layout);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Reads file bytes, checking the magic number, version and checksum.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let mut r = Reader { bytes, at: MAGIC.len() };
        let version = r.u32()?;
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(SnapshotError::Version { found: version });
        }
        let body_len = bytes.len().checked_sub(32).ok_or(SnapshotError::Corrupt("too short"))?;
        if body_len < r.at || Sha256::digest(&bytes[..body_len]).as_slice() != &bytes[body_len..] {
            return Err(SnapshotError::Corrupt("checksum mismatch (truncated or modified)"));
        }
        let r = &mut Reader { bytes: &bytes[..body_len], at: r.at };
        let module_hash: [u8; 32] = r.take(32)?.try_into().map_err(|_| SnapshotError::Corrupt("module hash"))?;
        let module = r.blob()?.to_vec();
        if Sha256::digest(&module).as_slice() != module_hash {
            return Err(SnapshotError::Corrupt("the embedded module does not match its hash"));
        }
        let mut args = Vec::new();
        for _ in 0..r.u32()? {
            args.push(r.string()?);
        }
        let mut env = Vec::new();
        for _ in 0..r.u32()? {
            env.push((r.string()?, r.string()?));
        }
        let fds = r.fds()?;
        let globals = r.globals()?;
        let memory = r.blob()?.to_vec();
        let frames = r.frames()?;
        let mut threads = Vec::new();
        if version >= 2 {
            for _ in 0..r.u32()? {
                let (tid, arg) = (r.u32()?, r.u32()?);
                threads.push(ThreadSnapshot { tid, arg, globals: r.globals()?, frames: r.frames()? });
            }
        }
        let mut processes = Vec::new();
        if version >= 3 {
            for _ in 0..r.u32()? {
                let (pid, parent) = (r.u32()?, r.u32()?);
                let p = match r.take(1)?[0] {
                    1 => {
                        let status = i32::from_le_bytes(r.take(4)?.try_into().map_err(|_| SnapshotError::Corrupt("wait status"))?);
                        ProcessSnapshot { pid, parent, ended: Some(status), fds: Vec::new(), globals: Vec::new(), memory: Vec::new(), frames: Vec::new() }
                    }
                    0 => {
                        let fds = r.fds()?;
                        let globals = r.globals()?;
                        let memory = r.blob()?.to_vec();
                        ProcessSnapshot { pid, parent, ended: None, fds, globals, memory, frames: r.frames()? }
                    }
                    _ => return Err(SnapshotError::Corrupt("unknown process state")),
                };
                processes.push(p);
            }
        }
        let frames_layout = match version {
            4.. => Some(r.take(32)?.try_into().map_err(|_| SnapshotError::Corrupt("frames layout"))?),
            _ => None,
        };
        if r.at != body_len {
            return Err(SnapshotError::Corrupt("trailing bytes"));
        }
        Ok(Snapshot { module_hash, module, args, env, fds, globals, memory, frames, threads, processes, frames_layout })
    }
}

fn cannot_describe(e: std::io::Error) -> SnapshotError {
    SnapshotError::State(format!("cannot describe the open files: {e}"))
}

/// Gives a fresh program memory the contents of a snapshot's.
fn load_memory(memory: &crate::program_memory::ProgramMemory, bytes: &[u8]) -> Result<(), SnapshotError> {
    let have = memory.size() as usize;
    if bytes.len() < have || !bytes.len().is_multiple_of(64 << 10) {
        return Err(SnapshotError::Corrupt("memory size is not a whole number of pages above the module's minimum"));
    }
    let grow = ((bytes.len() - have) >> 16) as u64;
    memory.grow(grow).map_err(|e| SnapshotError::State(format!("cannot grow memory to the snapshot's size: {e}")))?;
    if !memory.write(0, bytes) {
        return Err(SnapshotError::State("the program memory is smaller than the snapshot's".into()));
    }
    Ok(())
}

fn encode_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_fds(out: &mut Vec<u8>, fds: &[FdRecord]) {
    let string = encode_string;
    out.extend_from_slice(&(fds.len() as u32).to_le_bytes());
    for r in fds {
        out.extend_from_slice(&r.fd.to_le_bytes());
        out.extend_from_slice(&r.flags.to_le_bytes());
        match &r.kind {
            FdKind::Std { index } => out.extend_from_slice(&[0, *index]),
            FdKind::Preopen { name, host } => {
                out.push(1);
                string(out, name);
                string(out, &host.to_string_lossy());
            }
            FdKind::Dir { path } => {
                out.push(2);
                string(out, path);
            }
            FdKind::File { path, offset, readable, writable } => {
                out.push(3);
                string(out, path);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&[*readable as u8, *writable as u8]);
            }
            FdKind::Listener { addr } => {
                out.push(4);
                string(out, &addr.to_string());
            }
            FdKind::Stream => out.push(5),
            FdKind::Shared { pid, fd } => {
                out.push(6);
                out.extend_from_slice(&pid.to_le_bytes());
                out.extend_from_slice(&fd.to_le_bytes());
            }
        }
    }
}

fn encode_globals(out: &mut Vec<u8>, globals: &[(u32, ValType, u64)]) {
    out.extend_from_slice(&(globals.len() as u32).to_le_bytes());
    for (index, ty, bits) in globals {
        out.extend_from_slice(&index.to_le_bytes());
        out.push(ty.code());
        out.extend_from_slice(&bits.to_le_bytes());
    }
}

fn encode_blob(out: &mut Vec<u8>, blob: &[u8]) {
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(blob);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.checked_add(n).ok_or(SnapshotError::Corrupt("length overflow"))?;
        let out = self.bytes.get(self.at..end).ok_or(SnapshotError::Corrupt("truncated"))?;
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| SnapshotError::Corrupt("integer"))?))
    }

    fn string(&mut self) -> Result<String, SnapshotError> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| SnapshotError::Corrupt("string is not UTF-8"))
    }

    fn fds(&mut self) -> Result<Vec<FdRecord>, SnapshotError> {
        let mut fds = Vec::new();
        for _ in 0..self.u32()? {
            let fd = self.u32()?;
            let flags = u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| SnapshotError::Corrupt("fd flags"))?);
            let kind = match self.take(1)?[0] {
                0 => FdKind::Std { index: self.take(1)?[0] },
                1 => FdKind::Preopen { name: self.string()?, host: self.string()?.into() },
                2 => FdKind::Dir { path: self.string()? },
                3 => {
                    let path = self.string()?;
                    let offset = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| SnapshotError::Corrupt("offset"))?);
                    let rw = self.take(2)?;
                    FdKind::File { path, offset, readable: rw[0] != 0, writable: rw[1] != 0 }
                }
                4 => FdKind::Listener {
                    addr: self.string()?.parse().map_err(|_| SnapshotError::Corrupt("listener address"))?,
                },
                5 => FdKind::Stream,
                6 => FdKind::Shared { pid: self.u32()?, fd: self.u32()? },
                _ => return Err(SnapshotError::Corrupt("unknown fd kind")),
            };
            fds.push(FdRecord { fd, flags, kind });
        }
        Ok(fds)
    }

    fn globals(&mut self) -> Result<Vec<(u32, ValType, u64)>, SnapshotError> {
        let mut globals = Vec::new();
        for _ in 0..self.u32()? {
            let index = self.u32()?;
            let ty = ValType::from_code(self.take(1)?[0]).ok_or(SnapshotError::Corrupt("unknown global type"))?;
            let bits = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| SnapshotError::Corrupt("global"))?);
            globals.push((index, ty, bits));
        }
        Ok(globals)
    }

    /// A frame stack, which must at least parse; typing it needs the module.
    fn frames(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let frames = self.blob()?.to_vec();
        let frame_sp = u32::try_from(frames.len())
            .ok()
            .and_then(|len| len.checked_add(abi::control::FRAMES_BASE))
            .ok_or(SnapshotError::Corrupt("the frame stack is larger than a control memory can hold"))?;
        let mut control = vec![0u8; abi::control::FRAMES_BASE as usize];
        control[abi::control::FRAME_SP as usize..abi::control::FRAME_SP as usize + 4].copy_from_slice(&frame_sp.to_le_bytes());
        control.extend_from_slice(&frames);
        abi::read_frames(&control).map_err(|_| SnapshotError::Corrupt("unreadable frame stack"))?;
        Ok(frames)
    }

    fn blob(&mut self) -> Result<&'a [u8], SnapshotError> {
        let len = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| SnapshotError::Corrupt("length"))?);
        let len = usize::try_from(len).map_err(|_| SnapshotError::Corrupt("length"))?;
        self.take(len)
    }
}

impl Guest {
    /// Captures a paused guest ([`crate::Exit::Paused`]): memory, mutable globals
    /// and frames. The guest stays paused; [`Guest::run`] resumes it.
    pub fn snapshot(&mut self) -> Result<Snapshot, SnapshotError> {
        let state = |m: &str| SnapshotError::State(m.to_string());
        let (globals, frames) = self.thread_state()?;
        let mut threads = Vec::new();
        if let Some(program) = &self.threads {
            let parked = program.parked();
            if parked.len() != program.count() {
                return Err(state("a thread of the program is not paused"));
            }
            for (tid, guest) in parked {
                let mut g = guest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (globals, frames) = g.thread_state()?;
                let arg = match g.entry {
                    crate::process::Entry::Thread { arg, .. } => arg as u32,
                    crate::process::Entry::Main => return Err(state("a thread recorded as the main one")),
                };
                threads.push(ThreadSnapshot { tid, arg, globals, frames });
            }
        }
        let u = self.unwinder.as_ref().ok_or_else(|| state("a module loaded without instrumentation cannot be snapshotted"))?;
        let mut described = Described::new();
        let fds = persist::describe_process(&self.store.data().wasi, 1, &mut described).map_err(cannot_describe)?;
        let processes = self.other_processes(&mut described)?;
        let wasi = &self.store.data().wasi;
        Ok(Snapshot {
            module_hash: self.module.hash,
            module: self.module.original.to_vec(),
            args: wasi.args.clone(),
            env: wasi.env.clone(),
            fds,
            globals,
            memory: u.memory.read(0, u.memory.size()).ok_or_else(|| state("the program memory cannot be read"))?,
            frames,
            threads,
            processes,
            frames_layout: self.module.frames_layout,
        })
    }

    /// The other processes of a paused program that forks, in pid order;
    /// `described` holds the open objects described so far.
    fn other_processes(&self, described: &mut Described) -> Result<Vec<ProcessSnapshot>, SnapshotError> {
        let Some(program) = self.first_process_of() else { return Ok(Vec::new()) };
        let mut parked: std::collections::BTreeMap<u32, _> = program.parked().into_iter().collect();
        if parked.len() != program.children() {
            return Err(SnapshotError::State("a process of the program is not paused".into()));
        }
        let mut processes = Vec::new();
        for p in program.list().into_iter().filter(|p| p.pid != 1) {
            let recorded = match (p.ended, parked.remove(&p.pid)) {
                (Some(status), _) => ProcessSnapshot {
                    pid: p.pid,
                    parent: p.parent,
                    ended: Some(status),
                    fds: Vec::new(),
                    globals: Vec::new(),
                    memory: Vec::new(),
                    frames: Vec::new(),
                },
                (None, Some(guest)) => {
                    let mut g = lock(&guest);
                    let (globals, frames) = g.thread_state()?;
                    let fds = persist::describe_process(&g.store.data().wasi, p.pid, described).map_err(cannot_describe)?;
                    let u = g.unwinder.as_ref().ok_or_else(|| SnapshotError::State("a process without instrumentation".into()))?;
                    let memory = u.memory.read(0, u.memory.size()).ok_or_else(|| SnapshotError::State(format!("the memory of process {} cannot be read", p.pid)))?;
                    ProcessSnapshot { pid: p.pid, parent: p.parent, ended: None, fds, globals, memory, frames }
                }
                (None, None) => return Err(SnapshotError::State(format!("process {} is not paused", p.pid))),
            };
            processes.push(recorded);
        }
        Ok(processes)
    }

    /// A paused thread's own state: its mutable globals and its frames.
    fn thread_state(&mut self) -> Result<(Vec<(u32, ValType, u64)>, Vec<u8>), SnapshotError> {
        let paused = self.unwinder.as_ref().is_some_and(|u| u.paused.is_some());
        if self.unwinder.is_some() && !paused {
            return Err(SnapshotError::State("the guest is not paused".into()));
        }
        self.unwound_state()
    }

    /// The mutable globals and saved frames of a thread that has unwound
    /// (paused, or stopped where it asked the host to act, as at a fork).
    pub(crate) fn unwound_state(&mut self) -> Result<(Vec<(u32, ValType, u64)>, Vec<u8>), SnapshotError> {
        let state = |m: &str| SnapshotError::State(m.to_string());
        let u = self.unwinder.as_ref().ok_or_else(|| state("a module loaded without instrumentation cannot be snapshotted"))?;
        let mut globals = Vec::new();
        for g in &u.metadata.globals {
            let global = self
                .instance
                .get_global(&mut self.store, &g.export)
                .ok_or_else(|| SnapshotError::State(format!("global export `{}` is missing", g.export)))?;
            let bits = match global.get(&mut self.store) {
                Val::I32(v) => v as u32 as u64,
                Val::I64(v) => v as u64,
                Val::F32(v) => v as u64,
                Val::F64(v) => v,
                _ => return Err(state("a reference-typed global cannot be snapshotted")),
            };
            globals.push((g.index, g.ty, bits));
        }
        Ok((globals, u.control.frame_bytes()))
    }

    /// A new guest process of `module` that resumes `snapshot` when run:
    /// memory, globals, frames and fd table restored, the stack rewound on
    /// [`Guest::run`]. `config` gives the new process its standard streams,
    /// and listeners that take the place of the recorded ones in order (the
    /// others are bound to their old addresses); its directories, arguments
    /// and environment come from the snapshot.
    pub fn restore(
        engine: &Engine,
        module: &GuestModule,
        mut config: GuestConfig,
        snapshot: &Snapshot,
    ) -> Result<Guest, SnapshotError> {
        snapshot.check_module(module)?;
        // Every thread rewinds at once: no use for the unwind-only variant.
        let module = &module.rewinding().map_err(|e| SnapshotError::State(e.to_string()))?;
        let listeners = std::mem::take(&mut config.listeners);
        config.dirs.clear();
        config.args = snapshot.args.clone();
        config.env = snapshot.env.clone();
        let mut guest = Guest::new(engine, module, config).map_err(|e| SnapshotError::State(e.to_string()))?;
        // The standard streams alone, for the other processes' tables.
        let standard = guest.wasi().fds.fork();
        persist::rebuild(guest.wasi(), &snapshot.fds, listeners, &|_, _| None).map_err(SnapshotError::State)?;
        let u = guest
            .unwinder
            .as_mut()
            .ok_or_else(|| SnapshotError::State("a module loaded without instrumentation cannot resume a snapshot".into()))?;
        load_memory(&u.memory, &snapshot.memory)?;
        guest.resume_thread(&snapshot.globals, &snapshot.frames)?;
        let store = &mut guest.store;
        let drop_data = guest
            .instance
            .get_typed_func::<(), ()>(&mut *store, exports::DROP_DATA)
            .map_err(|e| SnapshotError::State(one_line(&e)))?;
        drop_data.call(&mut *store, ()).map_err(|e| SnapshotError::State(one_line(&e)))?;
        guest.started = true;
        guest.restore_processes(&snapshot.processes, &standard)?;
        if !snapshot.threads.is_empty() {
            let Some(program) = guest.threads.clone() else {
                return Err(SnapshotError::Corrupt("threads recorded for a module that starts none"));
            };
            for t in &snapshot.threads {
                let wasi = guest.store.data().wasi.for_thread().map_err(|e| SnapshotError::State(e.to_string()))?;
                let mut worker = Guest::thread(engine, module, &program, wasi, t.tid, t.arg as i32)
                    .map_err(|e| SnapshotError::State(format!("cannot recreate thread {}: {e}", t.tid)))?;
                worker.resume_thread(&t.globals, &t.frames)?;
                program.adopt(t.tid, worker).map_err(SnapshotError::State)?;
            }
        }
        Ok(guest)
    }

    /// Recreates the other processes of a restored program that forks,
    /// each paused in its frames, with fd tables that share what they
    /// shared; `standard` is a table of the standard streams alone.
    fn restore_processes(&mut self, processes: &[ProcessSnapshot], standard: &crate::wasi::fd_table::SharedFdTable) -> Result<(), SnapshotError> {
        if processes.is_empty() {
            return Ok(());
        }
        let Some(program) = self.first_process_of() else {
            return Err(SnapshotError::Corrupt("processes recorded for a module that does not fork"));
        };
        let mut tables = std::collections::HashMap::from([(1, self.store.data().wasi.fds.clone())]);
        for p in processes {
            let Some(status) = p.ended else { continue };
            program.adopt_ended(p.pid, p.parent, status).map_err(SnapshotError::State)?;
        }
        for p in processes.iter().filter(|p| p.ended.is_none()) {
            let mut wasi = self.store.data().wasi.for_process().map_err(|e| SnapshotError::State(e.to_string()))?;
            wasi.fds = standard.fork();
            let shared = |pid: u32, fd: u32| tables.get(&pid).and_then(|t| t.get(fd).ok()).map(|d| d.object);
            persist::rebuild(&mut wasi, &p.fds, Vec::new(), &shared).map_err(|e| SnapshotError::State(format!("process {}: {e}", p.pid)))?;
            tables.insert(p.pid, wasi.fds.clone());
            let memory = self.process_memory(&program).map_err(|e| SnapshotError::State(format!("cannot recreate process {}: {e}", p.pid)))?;
            load_memory(&memory, &p.memory)?;
            let child = self
                .another_process(wasi, memory, &p.globals, &p.frames)
                .map_err(|e| SnapshotError::State(format!("cannot recreate process {}: {e}", p.pid)))?;
            program.adopt(p.pid, p.parent, child).map_err(SnapshotError::State)?;
        }
        Ok(())
    }

    /// Gives a thread of a restored program its globals and frames; it
    /// rewinds into them when it next runs.
    pub(crate) fn resume_thread(&mut self, globals: &[(u32, ValType, u64)], frames: &[u8]) -> Result<(), SnapshotError> {
        let store = &mut self.store;
        let u = self
            .unwinder
            .as_mut()
            .ok_or_else(|| SnapshotError::State("a module loaded without instrumentation cannot resume a snapshot".into()))?;
        for (index, ty, bits) in globals {
            let export = upstare_instrument::abi::exports::global(*index);
            let global = self
                .instance
                .get_global(&mut *store, &export)
                .ok_or(SnapshotError::Corrupt("a global the module does not have"))?;
            let val = match ty {
                ValType::I32 => Val::I32(*bits as u32 as i32),
                ValType::I64 => Val::I64(*bits as i64),
                ValType::F32 => Val::F32(*bits as u32),
                ValType::F64 => Val::F64(*bits),
                _ => return Err(SnapshotError::Corrupt("reference-typed global")),
            };
            global.set(&mut *store, val).map_err(|_| SnapshotError::Corrupt("global of the wrong type"))?;
        }
        u.control.set_frames(frames).map_err(SnapshotError::State)?;
        let raw = u.control.frames().map_err(|_| SnapshotError::Corrupt("unreadable frame stack"))?;
        let frames = raw
            .iter()
            .map(|f| TypedFrame::new(f, &u.metadata))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| SnapshotError::Corrupt("frames the module's metadata does not describe"))?;
        if frames.is_empty() {
            return Err(SnapshotError::Corrupt("no frames"));
        }
        u.paused = Some(frames);
        self.started = true;
        Ok(())
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot of a trivial module, with one of every fd kind.
    fn sample() -> Snapshot {
        let module = b"\0asm\x01\0\0\0".to_vec();
        Snapshot {
            module_hash: Sha256::digest(&module).into(),
            module,
            args: vec!["prog".into(), "é".into()],
            env: vec![("A".into(), "b=c".into())],
            fds: vec![
                FdRecord { fd: 0, flags: 0, kind: FdKind::Std { index: 0 } },
                FdRecord { fd: 3, flags: 0, kind: FdKind::Listener { addr: "127.0.0.1:80".parse().unwrap() } },
                FdRecord { fd: 4, flags: 1, kind: FdKind::Preopen { name: "/data".into(), host: "/srv/data".into() } },
                FdRecord { fd: 5, flags: 0, kind: FdKind::Dir { path: "/data/sub".into() } },
                FdRecord {
                    fd: 6,
                    flags: 4,
                    kind: FdKind::File { path: "/data/f".into(), offset: 1 << 40, readable: true, writable: false },
                },
                FdRecord { fd: 7, flags: 0, kind: FdKind::Stream },
            ],
            globals: vec![(0, ValType::I32, 66560), (2, ValType::F64, 1.5f64.to_bits())],
            memory: vec![7; 65536],
            frames: Vec::new(),
            threads: vec![ThreadSnapshot { tid: 3, arg: 70000, globals: vec![(0, ValType::I32, 1)], frames: Vec::new() }],
            processes: vec![
                ProcessSnapshot {
                    pid: 2,
                    parent: 1,
                    ended: None,
                    fds: vec![
                        FdRecord { fd: 0, flags: 0, kind: FdKind::Std { index: 0 } },
                        FdRecord { fd: 3, flags: 0, kind: FdKind::Shared { pid: 1, fd: 3 } },
                    ],
                    globals: vec![(0, ValType::I32, 66000)],
                    memory: vec![9; 65536],
                    frames: Vec::new(),
                },
                ProcessSnapshot {
                    pid: 5,
                    parent: 2,
                    ended: Some(3 << 8),
                    fds: Vec::new(),
                    globals: Vec::new(),
                    memory: Vec::new(),
                    frames: Vec::new(),
                },
            ],
            frames_layout: Some([5; 32]),
        }
    }

    fn seal(mut body: Vec<u8>) -> Vec<u8> {
        let sum = Sha256::digest(&body);
        body.extend_from_slice(&sum);
        body
    }

    fn corrupt(bytes: &[u8]) -> &'static str {
        match Snapshot::decode(bytes) {
            Err(SnapshotError::Corrupt(reason)) => reason,
            other => panic!("expected a damaged snapshot, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn every_field_survives_encoding() {
        let s = sample();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn a_version_1_snapshot_reads_as_one_thread() {
        let mut one = sample();
        one.threads.clear();
        one.processes.clear();
        let bytes = one.encode();
        one.frames_layout = None;
        // Version 1 ends at the frames: no thread or process count, no layout.
        let mut v1 = bytes[..bytes.len() - 32 - 32 - 8].to_vec();
        v1[16..20].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Snapshot::decode(&seal(v1)).unwrap(), one);
    }

    #[test]
    fn a_version_3_snapshot_reads_without_a_layout_and_is_written_as_one() {
        let mut three = sample();
        let bytes = three.encode();
        three.frames_layout = None;
        let mut v3 = bytes[..bytes.len() - 32 - 32].to_vec();
        v3[16..20].copy_from_slice(&3u32.to_le_bytes());
        let v3 = seal(v3);
        assert_eq!(Snapshot::decode(&v3).unwrap(), three);
        assert_eq!(three.encode(), v3);
    }

    #[test]
    fn a_version_2_snapshot_reads_as_one_process() {
        let mut one = sample();
        one.processes.clear();
        let bytes = one.encode();
        one.frames_layout = None;
        // Version 2 ends at the threads: no process count, no layout.
        let mut v2 = bytes[..bytes.len() - 32 - 32 - 4].to_vec();
        v2[16..20].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(Snapshot::decode(&seal(v2)).unwrap(), one);
    }

    #[test]
    fn the_header_and_checksum_are_checked_first() {
        let bytes = sample().encode();
        assert!(matches!(Snapshot::decode(b"UPSTARE"), Err(SnapshotError::NotASnapshot)));
        let mut version = bytes.clone();
        version[16] = 5;
        assert!(matches!(Snapshot::decode(&version), Err(SnapshotError::Version { found: 5 })));
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert_eq!(corrupt(&flipped), "checksum mismatch (truncated or modified)");
        assert_eq!(corrupt(&bytes[..bytes.len() - 1]), "checksum mismatch (truncated or modified)");
        assert_eq!(corrupt(&bytes[..20]), "too short");
        // Exactly the magic number: a snapshot, cut short.
        assert_eq!(corrupt(MAGIC), "truncated");
        // A header and a checksum that matches it, and nothing else.
        assert_eq!(corrupt(&seal(bytes[..20].to_vec())), "truncated");
    }

    #[test]
    fn sealed_structural_faults_are_named() {
        let s = sample();
        let body = |s: &Snapshot| {
            let b = s.encode();
            b[..b.len() - 32].to_vec()
        };
        let at_args = 16 + 4 + 32 + 8 + s.module.len();
        let mut trailing = body(&s);
        trailing.push(0);
        assert_eq!(corrupt(&seal(trailing)), "trailing bytes");
        let mut truncated = body(&s);
        truncated.truncate(truncated.len() - 1);
        assert_eq!(corrupt(&seal(truncated)), "truncated");
        let mut many = body(&s);
        many[at_args..at_args + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(corrupt(&seal(many)), "truncated");
        let mut not_utf8 = body(&s);
        not_utf8[at_args + 4 + 4 + 4 + 4] = 0xff; // the first byte of "é"
        assert_eq!(corrupt(&seal(not_utf8)), "string is not UTF-8");
        let mut hash = s.clone();
        hash.module_hash[0] ^= 1;
        assert_eq!(corrupt(&hash.encode()), "the embedded module does not match its hash");
        let mut frames = s.clone();
        frames.frames = vec![0; 12];
        assert_eq!(corrupt(&frames.encode()), "unreadable frame stack");

        // Each fd kind byte, found after its record's fd and flags, made
        // unknown; the listener's address made unreadable.
        let fds_at = at_args + 4 + (4 + 4) + (4 + 2) + 4 + (4 + 1) + (4 + 3);
        let mut kind = body(&s);
        assert_eq!(u32::from_le_bytes(kind[fds_at..fds_at + 4].try_into().unwrap()), 6, "the layout this test edits");
        kind[fds_at + 4 + 4 + 2] = 9;
        assert_eq!(corrupt(&seal(kind)), "unknown fd kind");
        let mut listener = s.clone();
        listener.fds[1].kind = FdKind::Dir { path: "127.0.0.1:80".into() };
        let mut bytes = body(&listener);
        let listener_kind = fds_at + 4 + (4 + 2 + 2) + 4 + 2;
        assert_eq!(bytes[listener_kind], 2, "the layout this test edits");
        bytes[listener_kind] = 4;
        let mut port = bytes.clone();
        let text = listener_kind + 1 + 4;
        port[text..text + 9].copy_from_slice(b"nowhere:x");
        assert_eq!(corrupt(&seal(port)), "listener address");
        assert_eq!(
            Snapshot::decode(&seal(bytes)).unwrap().fds[1].kind,
            FdKind::Listener { addr: "127.0.0.1:80".parse().unwrap() }
        );

        // Without processes, the threads section ends the body before
        // their empty count and the layout: its count, then per thread
        // tid, arg, its globals (count, 13 bytes each) and frames.
        let mut s = s.clone();
        s.processes.clear();
        let threads_len = 4 + s.threads.iter().map(|t| 4 + 4 + 4 + 13 * t.globals.len() + 8 + t.frames.len()).sum::<usize>();
        let globals_at = body(&s).len() - 32 - 4 - threads_len - (8 + s.frames.len()) - (8 + s.memory.len()) - 13 * s.globals.len() - 4;
        let mut global = body(&s);
        assert_eq!(u32::from_le_bytes(global[globals_at..globals_at + 4].try_into().unwrap()), 2, "the layout this test edits");
        global[globals_at + 4 + 4] = 0x99;
        assert_eq!(corrupt(&seal(global)), "unknown global type");

        // The last process's state byte made unknown (its frames end the
        // body before the layout).
        let mut one = sample();
        one.processes.truncate(1);
        let mut state = body(&one);
        let p = &one.processes[0];
        let state_at = state.len() - 32 - (8 + p.frames.len()) - (8 + p.memory.len()) - (4 + 13 * p.globals.len()) - (4 + (4 + 2 + 2) + (4 + 2 + 1 + 8)) - 1;
        assert_eq!(state[state_at - 4..state_at], 1u32.to_le_bytes(), "the layout this test edits");
        state[state_at] = 7;
        assert_eq!(corrupt(&seal(state)), "unknown process state");
    }
}
