//! The program's futex table: what `memory.atomic.wait32`,
//! `memory.atomic.wait64` and `memory.atomic.notify` do, once the
//! instrumenter has made them calls of the host
//! ([`upstare_instrument::abi::futex`]).
//!
//! One [`Futexes`] serves every thread of a program (each thread's store
//! holds an `Arc` of it), keyed by the effective address in the program
//! memory. A wait compares the value and enqueues itself under the same
//! lock a notify takes, so a notify that follows the program's store of a
//! new value either finds the waiter queued or the waiter sees the new
//! value: no wake-up is lost. Waiters of one address are woken in the order
//! they came.
//!
//! A waiting thread parks through its own [`Interrupter`], so a pause
//! request wakes it: the wait returns [`WaitOutcome::Interrupted`] and the
//! guest unwinds; the rewind waits again, which a futex wait may always do
//! (it may wake spuriously). A waiter both notified and interrupted reports
//! [`WaitOutcome::Woken`] and leaves the request pending for the next
//! update point: reporting the interruption would lose the notify's
//! wake-up, which was counted in its result.

use std::cell::UnsafeCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::interrupt::{Interrupter, Parked, Waker};

/// How a wait ended. The first three are the instruction's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Woken by a notify (0).
    Woken = 0,
    /// The value differed from the expected one (1).
    NotEqual = 1,
    /// The timeout passed (2).
    TimedOut = 2,
    /// The host interrupted the wait; the guest unwinds and waits again.
    Interrupted = 3,
}

/// Where the instruction would trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FutexError {
    /// The accessed bytes do not all lie in the memory.
    #[error("out of bounds memory access at {0:#x}")]
    OutOfBounds(u64),
    /// The address is not a multiple of the access size.
    #[error("unaligned atomic access at {0:#x}")]
    Unaligned(u64),
}

/// One waiting thread.
#[derive(Debug)]
struct Waiter {
    /// Set by a notify, under the table's lock, before it wakes the thread.
    woken: AtomicBool,
    waker: Waker,
}

/// The futex table of one program.
#[derive(Debug, Default)]
pub struct Futexes {
    queues: Mutex<HashMap<u64, VecDeque<Arc<Waiter>>>>,
}

/// The address of a `size`-byte atomic access at `addr` in `memory`, once
/// checked as the instruction checks it: in bounds first, then aligned.
fn locate(memory: &[UnsafeCell<u8>], addr: u64, size: u64) -> Result<*mut u8, FutexError> {
    let end = addr.checked_add(size).ok_or(FutexError::OutOfBounds(addr))?;
    if end > memory.len() as u64 {
        return Err(FutexError::OutOfBounds(addr));
    }
    if !addr.is_multiple_of(size) {
        return Err(FutexError::Unaligned(addr));
    }
    Ok(UnsafeCell::raw_get(memory[addr as usize..].as_ptr()))
}

impl Futexes {
    /// A table with no waiters.
    pub fn new() -> Self {
        Futexes::default()
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Arc<Waiter>>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `memory.atomic.wait32`: waits at `addr` of `memory` (a shared
    /// memory's bytes) while the i32 there equals `expected`, for at most
    /// `timeout_ns` (negative: forever), or until `interrupter` is asked to
    /// interrupt.
    pub fn wait32(
        &self,
        memory: &[UnsafeCell<u8>],
        addr: u64,
        expected: u32,
        timeout_ns: i64,
        interrupter: &Interrupter,
    ) -> Result<WaitOutcome, FutexError> {
        let at = locate(memory, addr, 4)?;
        // SAFETY: `at` is 4-aligned and its 4 bytes lie inside `memory`,
        // which outlives this call; every access of the guest to shared
        // memory may race with this load, which is what atomics are for.
        let current = || unsafe { &*(at as *const AtomicU32) }.load(Ordering::SeqCst);
        self.wait(addr, || current() == expected, timeout_ns, interrupter)
    }

    /// `memory.atomic.wait64`: [`Self::wait32`] on an i64.
    pub fn wait64(
        &self,
        memory: &[UnsafeCell<u8>],
        addr: u64,
        expected: u64,
        timeout_ns: i64,
        interrupter: &Interrupter,
    ) -> Result<WaitOutcome, FutexError> {
        let at = locate(memory, addr, 8)?;
        // SAFETY: as in `wait32`, for 8 aligned bytes.
        let current = || unsafe { &*(at as *const AtomicU64) }.load(Ordering::SeqCst);
        self.wait(addr, || current() == expected, timeout_ns, interrupter)
    }

    fn wait(
        &self,
        addr: u64,
        equal: impl FnOnce() -> bool,
        timeout_ns: i64,
        interrupter: &Interrupter,
    ) -> Result<WaitOutcome, FutexError> {
        if interrupter.take_pending() {
            return Ok(WaitOutcome::Interrupted);
        }
        let deadline = u64::try_from(timeout_ns).ok().map(|ns| Instant::now() + Duration::from_nanos(ns));
        let waiter = Arc::new(Waiter { woken: AtomicBool::new(false), waker: interrupter.waker() });
        {
            let mut queues = self.queues();
            if !equal() {
                return Ok(WaitOutcome::NotEqual);
            }
            queues.entry(addr).or_default().push_back(waiter.clone());
        }
        let parked = interrupter.park_until(deadline, || waiter.woken.load(Ordering::SeqCst));
        if parked == Parked::Ready {
            return Ok(WaitOutcome::Woken);
        }
        // Leave the queue, unless a notify took this waiter meanwhile: then
        // it counted the wake-up, and the waiter reports it.
        {
            let mut queues = self.queues();
            if waiter.woken.load(Ordering::SeqCst) {
                return Ok(WaitOutcome::Woken);
            }
            if let Some(q) = queues.get_mut(&addr) {
                q.retain(|w| !Arc::ptr_eq(w, &waiter));
                if q.is_empty() {
                    queues.remove(&addr);
                }
            }
        }
        Ok(match parked {
            Parked::Interrupted if interrupter.take_pending() => WaitOutcome::Interrupted,
            // A request withdrawn meanwhile: a spurious wake-up, which the
            // program must cope with anyway.
            Parked::Interrupted | Parked::Ready => WaitOutcome::Woken,
            Parked::TimedOut => WaitOutcome::TimedOut,
        })
    }

    /// `memory.atomic.notify`: wakes at most `count` waiters at `addr`,
    /// oldest first, and returns how many it woke. `memory` is only
    /// checked: the instruction traps where a wait at `addr` would.
    pub fn notify(&self, memory: &[UnsafeCell<u8>], addr: u64, count: u32) -> Result<u32, FutexError> {
        locate(memory, addr, 4)?;
        Ok(self.notify_at(addr, count))
    }

    /// Wakes at most `count` waiters at `addr`; returns how many it woke.
    pub fn notify_at(&self, addr: u64, count: u32) -> u32 {
        let mut woken = Vec::new();
        {
            let mut queues = self.queues();
            if let Some(q) = queues.get_mut(&addr) {
                while woken.len() < count as usize {
                    let Some(w) = q.pop_front() else { break };
                    w.woken.store(true, Ordering::SeqCst);
                    woken.push(w);
                }
                if q.is_empty() {
                    queues.remove(&addr);
                }
            }
        }
        // Outside the table's lock: a waiter leaving the queue takes it
        // after its parking lock is released, never while holding it, and
        // this takes the parking lock.
        for w in &woken {
            w.waker.wake();
        }
        woken.len() as u32
    }

    /// How many threads wait at `addr`.
    pub fn waiters(&self, addr: u64) -> usize {
        self.queues().get(&addr).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A one-page shared memory of a real engine, as a program has.
    fn memory() -> wasmtime::SharedMemory {
        let mut config = wasmtime::Config::new();
        config.wasm_threads(true).shared_memory(true);
        let engine = wasmtime::Engine::new(&config).unwrap();
        wasmtime::SharedMemory::new(&engine, wasmtime::MemoryType::shared(1, 1)).unwrap()
    }

    fn store32(m: &wasmtime::SharedMemory, addr: u64, v: u32) {
        let at = locate(m.data(), addr, 4).unwrap();
        // SAFETY: aligned and in bounds, checked by `locate`.
        unsafe { &*(at as *const AtomicU32) }.store(v, Ordering::SeqCst);
    }

    /// Waits until `n` threads wait at `addr`.
    fn until_waiting(f: &Futexes, addr: u64, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.waiters(addr) < n {
            assert!(Instant::now() < deadline, "the waiter never queued");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_wait_is_woken_by_a_notify() {
        let (m, f) = (memory(), Arc::new(Futexes::new()));
        let waiter = {
            let (m, f) = (m.clone(), f.clone());
            thread::spawn(move || f.wait32(m.data(), 64, 0, -1, &Interrupter::new().unwrap()))
        };
        until_waiting(&f, 64, 1);
        store32(&m, 64, 1);
        assert_eq!(f.notify(m.data(), 64, 1), Ok(1));
        assert_eq!(waiter.join().unwrap(), Ok(WaitOutcome::Woken));
        assert_eq!(f.waiters(64), 0);
    }

    #[test]
    fn a_wait_on_another_value_returns_at_once() {
        let (m, f) = (memory(), Futexes::new());
        store32(&m, 8, 7);
        let i = Interrupter::new().unwrap();
        assert_eq!(f.wait32(m.data(), 8, 6, -1, &i), Ok(WaitOutcome::NotEqual));
        assert_eq!(f.wait64(m.data(), 8, 6, -1, &i), Ok(WaitOutcome::NotEqual));
        assert_eq!(f.waiters(8), 0);
    }

    #[test]
    fn a_wait_times_out() {
        let (m, f) = (memory(), Futexes::new());
        let i = Interrupter::new().unwrap();
        let start = Instant::now();
        assert_eq!(f.wait64(m.data(), 16, 0, 20_000_000, &i), Ok(WaitOutcome::TimedOut));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(f.waiters(16), 0);
        assert_eq!(f.wait32(m.data(), 16, 0, 0, &i), Ok(WaitOutcome::TimedOut));
    }

    #[test]
    fn an_interrupt_wakes_a_parked_waiter() {
        let (m, f) = (memory(), Arc::new(Futexes::new()));
        let i = Interrupter::new().unwrap();
        let handle = i.handle();
        let waiter = {
            let (m, f) = (m.clone(), f.clone());
            thread::spawn(move || {
                let outcome = f.wait32(m.data(), 32, 0, -1, &i);
                (outcome, i.take_pending())
            })
        };
        until_waiting(&f, 32, 1);
        handle.interrupt();
        // Interrupted, the request taken, and out of the queue: a later
        // notify finds nobody.
        assert_eq!(waiter.join().unwrap(), (Ok(WaitOutcome::Interrupted), false));
        assert_eq!(f.notify(m.data(), 32, 1), Ok(0));
    }

    #[test]
    fn a_pending_request_interrupts_a_wait_at_once() {
        let (m, f) = (memory(), Futexes::new());
        let i = Interrupter::new().unwrap();
        i.handle().interrupt();
        assert_eq!(f.wait32(m.data(), 0, 0, -1, &i), Ok(WaitOutcome::Interrupted));
        assert!(!i.take_pending());
    }

    #[test]
    fn a_waiter_notified_and_interrupted_reports_woken_and_keeps_the_request() {
        let (m, f) = (memory(), Arc::new(Futexes::new()));
        let i = Interrupter::new().unwrap();
        let handle = i.handle();
        let (go, look) = std::sync::mpsc::channel::<()>();
        // Whether the waiter runs before the request comes or after, the
        // notify took it: it reports the wake-up, and the request is still
        // there once it has come.
        let waiter = {
            let (m, f) = (m.clone(), f.clone());
            thread::spawn(move || {
                let outcome = f.wait32(m.data(), 40, 0, -1, &i);
                look.recv().unwrap();
                (outcome, i.take_pending())
            })
        };
        until_waiting(&f, 40, 1);
        assert_eq!(f.notify(m.data(), 40, 1), Ok(1));
        handle.interrupt();
        go.send(()).unwrap();
        assert_eq!(waiter.join().unwrap(), (Ok(WaitOutcome::Woken), true));
    }

    #[test]
    fn notify_wakes_at_most_count_oldest_first() {
        let (m, f) = (memory(), Arc::new(Futexes::new()));
        let mut waiters = Vec::new();
        for n in 1..=3 {
            let (m, g) = (m.clone(), f.clone());
            waiters.push(thread::spawn(move || g.wait32(m.data(), 128, 0, -1, &Interrupter::new().unwrap())));
            until_waiting(&f, 128, n);
        }
        assert_eq!(f.notify(m.data(), 128, 2), Ok(2));
        let first = waiters.remove(0);
        let second = waiters.remove(0);
        assert_eq!(first.join().unwrap(), Ok(WaitOutcome::Woken));
        assert_eq!(second.join().unwrap(), Ok(WaitOutcome::Woken));
        assert_eq!(f.waiters(128), 1);
        assert_eq!(f.notify(m.data(), 128, u32::MAX), Ok(1));
        assert_eq!(waiters.remove(0).join().unwrap(), Ok(WaitOutcome::Woken));
        assert_eq!(f.notify(m.data(), 128, 5), Ok(0));
    }

    #[test]
    fn bad_addresses_trap_as_the_instruction_would() {
        let (m, f) = (memory(), Futexes::new());
        let i = Interrupter::new().unwrap();
        let size = m.data().len() as u64;
        assert_eq!(f.wait32(m.data(), 2, 0, 0, &i), Err(FutexError::Unaligned(2)));
        assert_eq!(f.wait64(m.data(), 4, 0, 0, &i), Err(FutexError::Unaligned(4)));
        assert_eq!(f.wait32(m.data(), size, 0, 0, &i), Err(FutexError::OutOfBounds(size)));
        assert_eq!(f.wait64(m.data(), size - 4, 0, 0, &i), Err(FutexError::OutOfBounds(size - 4)));
        assert_eq!(f.notify(m.data(), 1 << 33, 1), Err(FutexError::OutOfBounds(1 << 33)));
        assert_eq!(f.notify(m.data(), 6, 1), Err(FutexError::Unaligned(6)));
    }

    /// What the store of the instrumented test guest holds.
    struct Guest {
        wasi: crate::wasi::WasiCtx,
        hooks: Option<crate::wasi::UnwindHooks>,
    }

    impl crate::wasi::WasiView for Guest {
        fn wasi(&mut self) -> &mut crate::wasi::WasiCtx {
            &mut self.wasi
        }
        fn unwind_hooks(&self) -> Option<crate::wasi::UnwindHooks> {
            self.hooks.clone()
        }
    }

    /// Through the host's linker, an instrumented guest blocked in
    /// `memory.atomic.wait32` is woken by a notify from another thread, and
    /// unwinds when the host interrupts it.
    #[test]
    fn an_instrumented_wait_is_woken_by_notify_and_unwinds_when_interrupted() {
        use upstare_instrument::abi::{self, exports, State};
        let wat = r#"(module
          (import "env" "memory" (memory 1 1 shared))
          (export "memory" (memory 0))
          (func (export "wait") (param i32) (result i32)
            local.get 0
            i32.const 0
            i64.const -1
            memory.atomic.wait32 offset=4))"#;
        let out = upstare_instrument::instrument(&wat::parse_str(wat).unwrap(), &Default::default()).unwrap();
        let engine = crate::new_engine().unwrap();
        let module = wasmtime::Module::new(&engine, &out.wasm).unwrap();
        let wasi = crate::wasi::WasiCtx::detached().unwrap();
        let (futexes, handle) = (wasi.futexes().clone(), wasi.interrupter().handle());
        let mut store = wasmtime::Store::new(&engine, Guest { wasi, hooks: None });
        let mut linker = wasmtime::Linker::new(&engine);
        crate::wasi::add_to_linker(&mut linker).unwrap();
        let memory = crate::program_memory::ProgramMemory::new(&engine, &out.metadata.memory).unwrap();
        let control = crate::pause::ControlMemory::new(&engine, abi::control::Header::default()).unwrap();
        linker.define(&store, abi::IMPORT_MODULE, abi::MEMORY_IMPORT, memory.shared().clone()).unwrap();
        linker.define(&store, abi::IMPORT_MODULE, abi::CONTROL_IMPORT, control.memory().clone()).unwrap();
        let instance = linker.instantiate(&mut store, &module).unwrap();
        let state = instance.get_global(&mut store, exports::STATE).unwrap();
        let stop_rewind = instance.get_typed_func(&mut store, exports::STOP_REWIND).unwrap();
        store.data_mut().hooks = Some(crate::wasi::UnwindHooks { state, stop_rewind });
        instance.get_typed_func::<(), ()>(&mut store, exports::INIT_MEMORY).unwrap().call(&mut store, ()).unwrap();
        let wait = instance.get_typed_func::<i32, i32>(&mut store, "wait").unwrap();

        // Woken: the instruction's 0, and the guest runs on normally.
        let notifier = {
            let futexes = futexes.clone();
            thread::spawn(move || {
                until_waiting(&futexes, 68, 1);
                futexes.notify_at(68, 1)
            })
        };
        assert_eq!(wait.call(&mut store, 64).unwrap(), 0);
        assert_eq!(notifier.join().unwrap(), 1);
        assert_eq!(state.get(&mut store).i32(), Some(State::Normal as i32));

        // Interrupted: the guest unwinds from the wait, and nobody waits.
        let interrupter = {
            let futexes = futexes.clone();
            thread::spawn(move || {
                until_waiting(&futexes, 68, 1);
                handle.interrupt();
            })
        };
        wait.call(&mut store, 64).unwrap();
        interrupter.join().unwrap();
        assert_eq!(state.get(&mut store).i32(), Some(State::Unwinding as i32));
        assert_eq!(futexes.waiters(68), 0);

        // A misaligned address traps as the instruction would.
        let stop_unwind = instance.get_typed_func::<(), ()>(&mut store, exports::STOP_UNWIND).unwrap();
        stop_unwind.call(&mut store, ()).unwrap();
        let trap = wait.call(&mut store, 65).unwrap_err();
        assert_eq!(trap.downcast_ref::<wasmtime::Trap>(), Some(&wasmtime::Trap::HeapMisaligned), "{trap:?}");
    }
}
