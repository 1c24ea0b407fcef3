//! The processes of a program (the `upstare` process imports of
//! `upstare.h`): `fork` at an unwind, `waitpid`, `getpid`, `getppid`
//! and `kill`, and the table of a program's processes with their parents
//! and exit statuses.
//!
//! The first process is the [`Guest`] the embedder runs (pid 1); each fork
//! makes another, with its own program memory, control memory, store and
//! instance, on an OS thread of its own that this module drives. A fork
//! happens at an unwind: the guest's `fork` call asks for one, and once the
//! stack is saved the host gives the child the memory (copy-on-write, or
//! a copy: [`crate::fork_memory`]) and the saved frames, and rewinds both, `fork` returning the child's pid in the parent
//! and 0 in the child. The child's fd table is a copy of the parent's whose
//! entries share the open objects (a prefork server's workers share the
//! listener).
//!
//! The other processes pause with the first: they form a
//! [`PauseGroup`], asked to stop when process 1 pauses and resumed with
//! it, so that an update finds the whole program at update points.
//!
//! A process that ends stays a zombie, with its wait status, until its
//! parent waits for it; the children of a process that ends pass to the
//! host (`getppid` says 0), which reaps them as they end. `kill`
//! asks the target to stop at its next update point and ends it there as
//! killed by the signal. The end of process 1 is the end of the program:
//! every other process is killed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use upstare_instrument::abi::{process, IMPORT_MODULE};
use wasmtime::{Caller, Linker};

use crate::fork_memory::ForkMemory;
use crate::interrupt::{Interrupter, Parked};
use crate::pause_group::{lock, PauseGroup, RunState};
use crate::process::{Exit, Guest, ProcessState};
use crate::program_memory::ProgramMemory;
use crate::threads::Stopper;
use crate::wasi::UnwindHooks;

/// Processes a program may have at once (zombies included), unless the
/// embedder says otherwise ([`crate::GuestConfig::max_processes`]).
pub const DEFAULT_MAX_PROCESSES: usize = 64;

/// The most processes any program may be allowed: each holds a program
/// memory of its own.
pub const MAX_PROCESSES: usize = 1024;

/// The signals `kill` knows: both end the process (WASI has no handlers).
pub const SIGKILL: i32 = 9;
/// See [`SIGKILL`].
pub const SIGTERM: i32 = 15;
/// The signal a process that trapped is reported as killed by, as a
/// native program that aborts is (the host's own exit status is then 134).
const SIGABRT: i32 = 6;

/// `waitpid`'s option not to wait.
const WNOHANG: i32 = 1;

/// WASI errno values the imports return negated.
mod errno {
    pub const AGAIN: i32 = 6;
    pub const CHILD: i32 = 12;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOSYS: i32 = 52;
    pub const SRCH: i32 = 71;
}

/// A wait status as `<stdlib.h>`'s `W*` macros read it: the exit code in
/// the second byte, or the signal in the low seven bits.
fn exited(code: i32) -> i32 {
    (code & 0xff) << 8
}

fn signaled(signal: i32) -> i32 {
    signal & 0x7f
}

/// The wait status of a process that ended with `exit`, or was stopped by
/// a `kill` of `killed`. A trap, or a host failure, ends it as an abort
/// does a native process.
pub(crate) fn wait_status(exit: &Exit, killed: Option<i32>) -> i32 {
    match (killed, exit) {
        (Some(signal), _) => signaled(signal),
        (None, Exit::Status(code)) => exited(*code),
        (None, Exit::Interrupted { .. }) => signaled(SIGKILL),
        (None, _) => signaled(SIGABRT),
    }
}

/// A process's place in its program. It lives in the process's WASI
/// context, which moves with the process to each version's store.
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    pub(crate) program: Arc<Processes>,
    pub(crate) pid: u32,
    /// Set by `fork`'s first call: the host forks at the unwind it asked
    /// for.
    pub(crate) fork_requested: bool,
    /// What `fork` returns when the rewind calls it again.
    pub(crate) fork_result: Option<i32>,
}

/// One process as the table sees it.
struct Entry {
    parent: u32,
    /// Its wait status, once it has ended (a zombie until waited for).
    ended: Option<i32>,
    /// The signal `kill` ended it with, until it stops for it.
    killed: Option<i32>,
    /// How to reach it while it runs; dropped when it ends, with its
    /// memory.
    live: Option<Live>,
}

/// How the table reaches a running process.
struct Live {
    stopper: Stopper,
    /// Where it waits for its children, to wake it when one ends.
    waker: Interrupter,
    /// Its memory (the first process's is the embedder's to know).
    memory: Option<ProgramMemory>,
}

impl Entry {
    /// A process that runs `child`, forked by `parent`.
    fn running(parent: u32, child: &Guest) -> Entry {
        let live = Live {
            stopper: child.stopper(),
            waker: child.store.data().wasi.interrupter.clone(),
            memory: child.unwinder.as_ref().map(|u| u.memory.clone()),
        };
        Entry { parent, ended: None, killed: None, live: Some(live) }
    }
}

#[derive(Default)]
struct Table {
    next_pid: u32,
    entries: BTreeMap<u32, Entry>,
    /// Set once process 1 has ended: no more forks.
    over: bool,
}

/// The processes of one program.
pub struct Processes {
    max: usize,
    /// How forks give a child its memory; also how a restore makes the
    /// processes' memories.
    fork_memory: ForkMemory,
    table: Mutex<Table>,
    /// Every process but the first, which pause with it.
    children: Arc<PauseGroup>,
    /// The host's imports, defined once: each process's link clones them
    /// and adds its own memories. Defining them anew cost about 50 us per
    /// fork and per process in an update's pause.
    imports: Linker<ProcessState>,
}

impl std::fmt::Debug for Processes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processes").field("max", &self.max).finish_non_exhaustive()
    }
}

/// A process as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid (0 for process 1).
    pub parent: u32,
    /// Its wait status, if it has ended and its parent has not waited yet.
    pub ended: Option<i32>,
    /// Whether it is parked in a pause of the program (always false for
    /// process 1, whose state is the program's).
    pub parked: bool,
    /// The function it stopped in, while parked.
    pub paused_in: Option<String>,
    /// The call that may block it, while it runs and is in one.
    pub in_call: Option<&'static str>,
}

impl Processes {
    /// The table of a program whose first process (pid 1) stops through
    /// `stopper` and waits through `waker`.
    pub(crate) fn new(max: usize, fork_memory: ForkMemory, stopper: Stopper, waker: Interrupter, imports: Linker<ProcessState>) -> Arc<Self> {
        let first = Entry { parent: 0, ended: None, killed: None, live: Some(Live { stopper, waker, memory: None }) };
        let table = Table { next_pid: 2, entries: BTreeMap::from([(1, first)]), over: false };
        Arc::new(Processes { max, fork_memory, table: Mutex::new(table), children: Arc::default(), imports })
    }

    /// How the program's forks give a child its memory.
    pub(crate) fn fork_memory(&self) -> ForkMemory {
        self.fork_memory
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Every change is a few assignments made without calling out.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The processes alive or not yet waited for, in pid order.
    pub fn list(&self) -> Vec<ProcessStatus> {
        let children: BTreeMap<u32, _> = self.children.list().into_iter().map(|c| (c.id, c)).collect();
        self.table()
            .entries
            .iter()
            .map(|(pid, e)| {
                let child = children.get(pid).filter(|_| e.ended.is_none());
                ProcessStatus {
                    pid: *pid,
                    parent: e.parent,
                    ended: e.ended,
                    parked: child.is_some_and(|c| c.state == RunState::Parked),
                    paused_in: child.and_then(|c| c.paused_in.clone()),
                    in_call: child.and_then(|c| c.in_call),
                }
            })
            .collect()
    }

    /// The host's imports, for a process's link (without its memories).
    pub(crate) fn imports(&self) -> Linker<ProcessState> {
        self.imports.clone()
    }

    /// The pids of the processes other than the first that have not ended.
    pub fn children_now(&self) -> Vec<u32> {
        self.table().entries.iter().filter(|(pid, e)| **pid != 1 && e.ended.is_none()).map(|(pid, _)| *pid).collect()
    }

    /// The largest memory of the processes other than the first: an
    /// update's fresh area must lie above it in every process.
    pub fn largest_child_memory(&self) -> u64 {
        self.table().entries.values().filter_map(|e| e.live.as_ref()?.memory.as_ref()).map(ProgramMemory::size).max().unwrap_or(0)
    }

    /// Asks every other process to pause (process 1 is asked by the
    /// caller); see [`PauseGroup::request_pause`].
    pub(crate) fn request_pause(&self) {
        self.children.request_pause();
    }

    /// Withdraws a pause request, but not the stop a `kill` asked for.
    pub(crate) fn cancel_pause(&self) {
        self.children.cancel_pause();
        let killed: Vec<Stopper> =
            self.table().entries.values().filter(|e| e.killed.is_some()).filter_map(|e| e.live.as_ref()).map(|l| l.stopper.clone()).collect();
        for stopper in killed {
            stopper.ask();
        }
    }

    /// Waits until every other process is parked (true), or the pause is
    /// withdrawn or the program ends (false).
    pub(crate) fn wait_parked(&self) -> bool {
        self.children.wait_parked()
    }

    /// The parked processes' guests, in pid order, while the program is
    /// paused.
    pub(crate) fn parked(&self) -> Vec<(u32, Arc<Mutex<Guest>>)> {
        self.children.parked()
    }

    /// How many processes besides the first are alive.
    pub(crate) fn children(&self) -> usize {
        self.children.count()
    }

    /// Lets every parked process run again.
    pub(crate) fn resume(&self) {
        self.children.resume();
    }

    /// How many processes have not ended.
    pub fn running(&self) -> usize {
        self.table().entries.values().filter(|e| e.ended.is_none()).count()
    }

    /// Whether the program may have one more process: the errno a fork
    /// returns if not (the program is at its limit, or ending). Checked
    /// before the memory is copied, and again as the child is recorded.
    fn room(&self, t: &Table) -> Result<(), i32> {
        if t.over {
            return Err(errno::AGAIN);
        }
        if t.entries.len() >= self.max {
            eprintln!("upstare-host: fork refused: the program already has {} processes (--max-processes)", self.max);
            return Err(errno::AGAIN);
        }
        Ok(())
    }

    /// Records a forked child of `parent` under a new pid, limits allowing,
    /// and returns the pid.
    fn admit(&self, parent: u32, child: &Guest) -> Result<u32, i32> {
        let mut t = self.table();
        self.room(&t)?;
        let mut pid = t.next_pid;
        while t.entries.contains_key(&pid) || pid < 2 {
            pid = pid.checked_add(1).filter(|p| *p < 1 << 22).unwrap_or(2);
        }
        t.next_pid = pid + 1;
        t.entries.insert(pid, Entry::running(parent, child));
        Ok(pid)
    }

    /// Takes in a process of a restored program, paused in its frames
    /// under `pid`; it runs once the program resumes.
    pub(crate) fn adopt(self: &Arc<Self>, pid: u32, parent: u32, mut child: Guest) -> Result<(), String> {
        if pid < 2 {
            return Err(format!("a process recorded as pid {pid}"));
        }
        {
            let mut t = self.table();
            if t.entries.contains_key(&pid) {
                return Err(format!("process {pid} is recorded twice"));
            }
            t.next_pid = t.next_pid.max(pid.saturating_add(1));
            t.entries.insert(pid, Entry::running(parent, &child));
        }
        child.store.data_mut().wasi.process = Some(Membership { program: self.clone(), pid, fork_requested: false, fork_result: None });
        self.start(pid, child, RunState::Parked)
    }

    /// Takes in a process of a restored program that had ended and was not
    /// waited for yet.
    pub(crate) fn adopt_ended(&self, pid: u32, parent: u32, status: i32) -> Result<(), String> {
        let mut t = self.table();
        if pid < 2 || t.entries.contains_key(&pid) {
            return Err(format!("process {pid} is recorded twice"));
        }
        t.next_pid = t.next_pid.max(pid.saturating_add(1));
        t.entries.insert(pid, Entry { parent, ended: Some(status), killed: None, live: None });
        Ok(())
    }

    /// Drives process `pid` on an OS thread of its own, from now or (a
    /// restored one) from the program's resume.
    fn start(self: &Arc<Self>, pid: u32, child: Guest, state: RunState) -> Result<(), String> {
        let program = self.clone();
        let started = self.children.start(pid, format!("process-{pid}"), child, state, move |guest| program.drive(pid, guest));
        if started.is_err() {
            self.table().entries.remove(&pid);
        }
        started
    }

    /// Runs a child until it ends, parking it at each pause of the program
    /// and resuming it after every stop that is not a `kill`.
    fn drive(&self, pid: u32, guest: Arc<Mutex<Guest>>) {
        let status = loop {
            let (exit, paused_in) = {
                let mut g = lock(&guest);
                let exit = g.run();
                (exit, g.paused_in())
            };
            let killed = self.killed(pid);
            match &exit {
                Exit::Paused if killed.is_none() => {
                    if !self.children.park(pid, paused_in) {
                        // The program ended while it was parked.
                        break wait_status(&exit, Some(SIGKILL));
                    }
                    // Killed while parked: the request the kill posted may
                    // have been served by an update's checked rewind.
                    if let Some(signal) = self.killed(pid) {
                        break wait_status(&exit, Some(signal));
                    }
                    continue;
                }
                Exit::Trap(report) => eprintln!("upstare-host: process {pid} trapped: {}", report.message),
                Exit::Interrupted { call } => eprintln!("upstare-host: process {pid} was interrupted in `{call}`"),
                Exit::HostError(e) => eprintln!("upstare-host: process {pid} failed: {e}"),
                Exit::Paused | Exit::Status(_) => {}
            }
            break wait_status(&exit, killed);
        };
        // Its open files close before its parent learns it ended.
        self.children.leave(pid);
        drop(guest);
        self.ended(pid, status);
    }

    /// The signal `pid` was killed with, if it was.
    pub(crate) fn killed(&self, pid: u32) -> Option<i32> {
        self.table().entries.get(&pid).and_then(|e| e.killed)
    }

    /// Records that `pid` ended with wait status `status`: its parent may
    /// now wait for it (one that has none left, the host reaps), and its
    /// own children pass to the host, which reaps them as they end. The
    /// end of process 1 ends every other.
    pub(crate) fn ended(&self, pid: u32, status: i32) {
        // Wake-ups are made once the table is unlocked: a process waiting
        // for a child checks the table from inside its wait.
        let (waker, stop) = {
            let mut t = self.table();
            let Some(entry) = t.entries.get_mut(&pid) else { return };
            entry.ended = Some(status);
            entry.live = None;
            let parent = entry.parent;
            if parent == 0 && pid != 1 {
                t.entries.remove(&pid);
            }
            t.entries.retain(|_, e| !(e.parent == pid && e.ended.is_some()));
            for child in t.entries.values_mut().filter(|e| e.parent == pid) {
                child.parent = 0;
            }
            let mut stop = Vec::new();
            if pid == 1 {
                t.over = true;
                for e in t.entries.values_mut() {
                    if let Some(live) = &e.live {
                        e.killed.get_or_insert(SIGKILL);
                        stop.push(live.stopper.clone());
                    }
                }
            }
            (t.entries.get(&parent).and_then(|p| p.live.as_ref()).map(|l| l.waker.clone()), stop)
        };
        if let Some(waker) = waker {
            waker.unpark();
        }
        for stopper in stop {
            stopper.ask();
        }
        if pid == 1 {
            // Parked processes stop rather than wait for a resume.
            self.children.end();
        }
    }

    /// `kill(pid, signal)`: 0, or a negative errno.
    fn kill(&self, pid: i32, signal: i32) -> i32 {
        if ![0, SIGKILL, SIGTERM].contains(&signal) {
            return -errno::INVAL;
        }
        let stopper = {
            let mut t = self.table();
            let Some(entry) = u32::try_from(pid).ok().and_then(|p| t.entries.get_mut(&p)).filter(|e| e.live.is_some()) else {
                return -errno::SRCH;
            };
            if signal == 0 {
                return 0;
            }
            entry.killed.get_or_insert(signal);
            let Some(live) = &entry.live else { return -errno::SRCH };
            live.stopper.clone()
        };
        stopper.ask();
        0
    }

    /// A child of `parent` that has ended and matches `pid` (-1: any),
    /// taken from the table with its status; `Err` if `parent` has no such
    /// child at all.
    fn reap(&self, parent: u32, pid: i32) -> Result<Option<(u32, i32)>, i32> {
        let mut t = self.table();
        let mut children = t.entries.iter().filter(|(p, e)| e.parent == parent && (pid == -1 || i64::from(**p) == i64::from(pid)));
        let mut any = false;
        let found = children.find_map(|(p, e)| {
            any = true;
            e.ended.map(|s| (*p, s))
        });
        if !any && found.is_none() {
            return Err(errno::CHILD);
        }
        if let Some((p, _)) = found {
            t.entries.remove(&p);
        }
        Ok(found)
    }
}

/// Copies `parent`'s memory, globals and saved frames into a new process
/// of the same program, which resumes from the same unwind with `fork`
/// returning 0. Returns the child's pid, or the errno the parent's `fork`
/// returns.
pub(crate) fn fork(parent: &mut Guest) -> i32 {
    let Some(member) = parent.store.data().wasi.process.clone() else { return -errno::NOSYS };
    let program = member.program.clone();
    // A fork bomb is refused before it copies anything.
    if let Err(e) = program.room(&program.table()) {
        return -e;
    }
    let mut child = match parent.forked() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("upstare-host: fork failed: {e}");
            return -errno::AGAIN;
        }
    };
    let pid = match program.admit(member.pid, &child) {
        Ok(pid) => pid,
        Err(e) => return -e,
    };
    child.store.data_mut().wasi.process = Some(Membership { program: program.clone(), pid, fork_requested: false, fork_result: Some(0) });
    match program.start(pid, child, RunState::Running) {
        Ok(()) => pid as i32,
        Err(e) => {
            eprintln!("upstare-host: fork failed: {e}");
            -errno::AGAIN
        }
    }
}

/// Defines the process imports for a program's stores.
pub(crate) fn add_to_linker(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    linker.func_wrap(IMPORT_MODULE, process::FORK, |mut caller: Caller<'_, ProcessState>| -> wasmtime::Result<i32> {
        let hooks = UnwindHooks::end_rewind(&mut caller)?;
        let Some(member) = caller.data_mut().wasi.process.as_mut() else { return Ok(-errno::NOSYS) };
        if let Some(result) = member.fork_result.take() {
            return Ok(result);
        }
        let Some(hooks) = hooks else {
            // Only an instrumented module unwinds, and a fork happens at an unwind.
            return Ok(-errno::NOSYS);
        };
        if caller.data().threads.is_some() {
            eprintln!("upstare-host: fork refused: the program runs threads");
            return Ok(-errno::NOSYS);
        }
        if let Some(member) = caller.data_mut().wasi.process.as_mut() {
            member.fork_requested = true;
        }
        hooks.unwind(&mut caller)?;
        Ok(0)
    })?;
    linker.func_wrap(IMPORT_MODULE, process::WAITPID, |mut caller: Caller<'_, ProcessState>, pid: i32, status: i32, options: i32| {
        waitpid(&mut caller, pid, status, options)
    })?;
    linker.func_wrap(IMPORT_MODULE, process::GETPID, |caller: Caller<'_, ProcessState>| -> i32 {
        caller.data().wasi.process.as_ref().map_or(1, |m| m.pid as i32)
    })?;
    linker.func_wrap(IMPORT_MODULE, process::GETPPID, |caller: Caller<'_, ProcessState>| -> i32 {
        let Some(m) = &caller.data().wasi.process else { return 0 };
        m.program.table().entries.get(&m.pid).map_or(0, |e| e.parent as i32)
    })?;
    linker.func_wrap(IMPORT_MODULE, process::KILL, |caller: Caller<'_, ProcessState>, pid: i32, signal: i32| -> i32 {
        match &caller.data().wasi.process {
            Some(m) => m.program.kill(pid, signal),
            None if pid == 1 => 0,
            None => -errno::SRCH,
        }
    })?;
    Ok(())
}

/// `waitpid`: waits, interruptibly, for a child to end.
fn waitpid(caller: &mut Caller<'_, ProcessState>, pid: i32, status: i32, options: i32) -> wasmtime::Result<i32> {
    let hooks = UnwindHooks::end_rewind(caller)?;
    // As before a blocking WASI call: a pause asked for stops the guest
    // here, before it reaps a child. An update's checked rewind ends here
    // with a pause always asked for; reaping then would lose the child's
    // status if the update rolls back.
    if let Some(h) = &hooks {
        if caller.data().wasi.interrupter.take_pending() {
            h.unwind(caller)?;
            return Ok(0);
        }
    }
    let Some(member) = caller.data().wasi.process.clone() else { return Ok(-errno::CHILD) };
    if options & !WNOHANG != 0 || pid == 0 || pid < -1 {
        return Ok(-errno::INVAL);
    }
    let interrupter = caller.data().wasi.interrupter.clone();
    // What the wait found, taken from the table under the wait's lock.
    let found = std::cell::Cell::new(None);
    let outcome = if options & WNOHANG != 0 {
        Parked::Woken
    } else {
        let _in_call = interrupter.enter("waitpid");
        interrupter.park(None, || match member.program.reap(member.pid, pid) {
            Ok(None) => false,
            other => {
                found.set(Some(other));
                true
            }
        })
    };
    if outcome == Parked::Interrupted {
        interrupter.take_pending();
        return match hooks {
            Some(h) => {
                h.unwind(caller)?;
                Ok(0)
            }
            None => Err(crate::wasi::Interrupted { call: "waitpid" }.into()),
        };
    }
    let reaped = match found.take() {
        Some(r) => r,
        None => member.program.reap(member.pid, pid),
    };
    let (child, code) = match reaped {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(0),
        Err(e) => return Ok(-e),
    };
    if status != 0 {
        let Some(memory) = ProgramMemory::exported_by(caller) else { return Ok(-errno::FAULT) };
        if !memory.write(status as u32 as u64, &code.to_le_bytes()) {
            return Ok(-errno::FAULT);
        }
    }
    Ok(child as i32)
}
