//! The futex waits and wakes of a wasi-threads program, done by the host.
//!
//! The instrumenter turns `memory.atomic.wait32`, `memory.atomic.wait64`
//! and `memory.atomic.notify` into calls of `upstare` imports
//! (`upstare_instrument::abi::futex`), so that a thread blocked under a
//! mutex, a condition variable or a join sits in a host call: one a pause
//! interrupts (the thread unwinds there, and its rewind waits again, which
//! futex semantics allow since a wait may always wake spuriously). The
//! waits and wakes of one program meet in its [`Futexes`]: the value check
//! and a waiter's registration happen under the lock a notify takes, so no
//! wake-up falls between them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use upstare_instrument::abi::{futex, IMPORT_MODULE};
use wasmtime::{Caller, Linker, Trap};

use crate::interrupt::{Interrupter, Parked};
use crate::program_memory::ProgramMemory;
use crate::wasi::{UnwindHooks, WasiView};

/// What `status` says a thread blocked here is in: the instruction the
/// guest executed (under a mutex, a condition variable or a join).
const WAIT_CALL: &str = "memory.atomic.wait";

/// How a wait ended, as the instruction reports it, or interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Woken by a notify (0).
    Woken,
    /// The value was not the expected one (1).
    NotEqual,
    /// The timeout passed (2).
    TimedOut,
    /// The host asked the thread to stop blocking; the request stays
    /// pending for the caller.
    Interrupted,
}

/// A thread waiting at an address.
#[derive(Debug)]
struct Waiter {
    notified: AtomicBool,
    interrupter: Interrupter,
}

/// The waiting threads of one program, by address.
#[derive(Debug, Default)]
pub struct Futexes {
    waiters: Mutex<HashMap<u64, Vec<Arc<Waiter>>>>,
}

impl Futexes {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Arc<Waiter>>>> {
        // Every change is one push or removal: a panic elsewhere cannot
        // leave the table half changed.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while `matches()` (the value at `addr` is the expected one,
    /// read under the table's lock) for at most `timeout_ns` (negative:
    /// forever), unless `interrupter` is asked to stop the thread.
    pub fn wait(&self, addr: u64, matches: impl FnOnce() -> bool, timeout_ns: i64, interrupter: &Interrupter) -> WaitOutcome {
        let deadline = u64::try_from(timeout_ns).ok().map(|ns| Instant::now().checked_add(Duration::from_nanos(ns)));
        let waiter = Arc::new(Waiter { notified: AtomicBool::new(false), interrupter: interrupter.clone() });
        {
            let mut table = self.table();
            if !matches() {
                return WaitOutcome::NotEqual;
            }
            table.entry(addr).or_default().push(waiter.clone());
        }
        // A deadline past what `Instant` holds is no deadline.
        let parked = interrupter.park(deadline.flatten(), || waiter.notified.load(Ordering::Acquire));
        if parked == Parked::Woken {
            return WaitOutcome::Woken;
        }
        let mut table = self.table();
        let list = table.get_mut(&addr);
        let still_waiting = list.as_ref().and_then(|l| l.iter().position(|w| Arc::ptr_eq(w, &waiter)));
        match (still_waiting, list) {
            (Some(i), Some(list)) => {
                list.swap_remove(i);
                if list.is_empty() {
                    table.remove(&addr);
                }
            }
            // A notify took it meanwhile and counted it as woken: it is,
            // or that wake-up would be lost to the program. An interrupt
            // stays pending for the next update point.
            _ => return WaitOutcome::Woken,
        }
        match parked {
            Parked::TimedOut => WaitOutcome::TimedOut,
            _ => WaitOutcome::Interrupted,
        }
    }

    /// Wakes at most `count` threads waiting at `addr`, the longest waiting
    /// first; returns how many.
    pub fn notify(&self, addr: u64, count: u32) -> u32 {
        let mut table = self.table();
        let Some(list) = table.get_mut(&addr) else { return 0 };
        let n = list.len().min(count as usize);
        for waiter in list.drain(..n) {
            waiter.notified.store(true, Ordering::Release);
            waiter.interrupter.unpark();
        }
        if list.is_empty() {
            table.remove(&addr);
        }
        n as u32
    }
}

/// The program memory of the calling instance (an instrumented module
/// exports its imported memory again as `memory`).
fn program_memory<T>(caller: &mut Caller<'_, T>) -> wasmtime::Result<ProgramMemory> {
    ProgramMemory::exported_by(caller).ok_or_else(|| wasmtime::format_err!("a futex import needs the program's shared memory, exported as `memory`"))
}

/// The address as the instruction would use it: in bounds for `width`
/// bytes and aligned to them, else the instruction's trap.
fn checked(memory: &ProgramMemory, addr: i64, width: u64) -> wasmtime::Result<u64> {
    let addr = u64::try_from(addr).map_err(|_| Trap::MemoryOutOfBounds)?;
    if addr.checked_add(width).is_none_or(|end| end > memory.size()) {
        return Err(Trap::MemoryOutOfBounds.into());
    }
    if !addr.is_multiple_of(width) {
        return Err(Trap::HeapMisaligned.into());
    }
    Ok(addr)
}

/// Runs a wait for the calling thread, and turns an interruption into an
/// unwind (the rewind makes the call again).
fn wait<T: WasiView>(caller: &mut Caller<'_, T>, addr: u64, matches: impl FnOnce() -> bool, timeout_ns: i64) -> wasmtime::Result<i32> {
    // Reached through `call_indirect` with the rewind still on: it ends
    // here, as for a blocking WASI call.
    let hooks = UnwindHooks::end_rewind(caller)?;
    let futexes = caller.data_mut().wasi().futexes();
    let interrupter = caller.data_mut().wasi().interrupter().clone();
    let outcome = if interrupter.take_pending() {
        WaitOutcome::Interrupted
    } else {
        let _in_call = interrupter.enter(WAIT_CALL);
        futexes.wait(addr, matches, timeout_ns, &interrupter)
    };
    Ok(match outcome {
        WaitOutcome::Woken => 0,
        WaitOutcome::NotEqual => 1,
        WaitOutcome::TimedOut => 2,
        WaitOutcome::Interrupted => {
            interrupter.take_pending();
            match hooks {
                Some(h) => {
                    h.unwind(caller)?;
                    0
                }
                // Nothing can unwind: waking is always allowed.
                None => 0,
            }
        }
    })
}

/// Defines the futex imports of an instrumented threads module.
pub fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(IMPORT_MODULE, futex::WAIT32, |mut caller: Caller<'_, T>, addr: i64, expected: i32, timeout: i64| {
        let memory = program_memory(&mut caller)?;
        let addr = checked(&memory, addr, 4)?;
        wait(&mut caller, addr, || memory.load_u32(addr) == Some(expected as u32), timeout)
    })?;
    linker.func_wrap(IMPORT_MODULE, futex::WAIT64, |mut caller: Caller<'_, T>, addr: i64, expected: i64, timeout: i64| {
        let memory = program_memory(&mut caller)?;
        let addr = checked(&memory, addr, 8)?;
        wait(&mut caller, addr, || memory.load_u64(addr) == Some(expected as u64), timeout)
    })?;
    linker.func_wrap(IMPORT_MODULE, futex::NOTIFY, |mut caller: Caller<'_, T>, addr: i64, count: i32| -> wasmtime::Result<i32> {
        let memory = program_memory(&mut caller)?;
        let addr = checked(&memory, addr, 4)?;
        let woken = caller.data_mut().wasi().futexes().notify(addr, count as u32);
        Ok(woken as i32)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use upstare_instrument::abi::State;

    fn waiting(futexes: &Arc<Futexes>, value: &Arc<AtomicU32>, timeout_ns: i64) -> (std::thread::JoinHandle<WaitOutcome>, Interrupter) {
        let interrupter = Interrupter::new().unwrap();
        let (f, v, i) = (futexes.clone(), value.clone(), interrupter.clone());
        let thread = std::thread::spawn(move || f.wait(8, || v.load(Ordering::SeqCst) == 0, timeout_ns, &i));
        (thread, interrupter)
    }

    /// Spins until `n` threads wait at `addr`.
    fn until_waiting_at(futexes: &Futexes, addr: u64, n: usize) {
        while futexes.table().get(&addr).map_or(0, Vec::len) < n {
            std::thread::yield_now();
        }
    }

    fn until_waiting(futexes: &Futexes, n: usize) {
        until_waiting_at(futexes, 8, n)
    }

    #[test]
    fn a_notify_wakes_waiters_up_to_its_count_and_says_how_many() {
        let (futexes, value) = (Arc::new(Futexes::default()), Arc::new(AtomicU32::new(0)));
        let (a, _ia) = waiting(&futexes, &value, -1);
        let (b, _ib) = waiting(&futexes, &value, -1);
        until_waiting(&futexes, 2);
        assert_eq!(futexes.notify(4, 10), 0, "nobody waits at another address");
        assert_eq!(futexes.notify(8, 1), 1);
        until_waiting(&futexes, 1);
        assert_eq!(futexes.notify(8, u32::MAX), 1);
        assert_eq!((a.join().unwrap(), b.join().unwrap()), (WaitOutcome::Woken, WaitOutcome::Woken));
        assert_eq!(futexes.notify(8, 1), 0);
    }

    #[test]
    fn a_value_other_than_expected_or_a_timeout_ends_the_wait() {
        let futexes = Futexes::default();
        let i = Interrupter::new().unwrap();
        assert_eq!(futexes.wait(8, || false, -1, &i), WaitOutcome::NotEqual);
        let started = Instant::now();
        assert_eq!(futexes.wait(8, || true, 20_000_000, &i), WaitOutcome::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert!(futexes.table().is_empty(), "a timed-out waiter is gone");
    }

    #[test]
    fn an_interrupt_wakes_a_parked_waiter_and_stays_pending() {
        let (futexes, value) = (Arc::new(Futexes::default()), Arc::new(AtomicU32::new(0)));
        let (thread, interrupter) = waiting(&futexes, &value, -1);
        until_waiting(&futexes, 1);
        interrupter.handle().interrupt();
        assert_eq!(thread.join().unwrap(), WaitOutcome::Interrupted);
        assert!(interrupter.take_pending(), "the request is left for the caller");
        assert!(futexes.table().is_empty(), "an interrupted waiter is gone");
        assert_eq!(futexes.notify(8, 1), 0);
    }

    /// What the store of the instrumented test guest holds.
    struct Store {
        wasi: crate::wasi::WasiCtx,
        hooks: Option<crate::wasi::UnwindHooks>,
    }

    impl WasiView for Store {
        fn wasi(&mut self) -> &mut crate::wasi::WasiCtx {
            &mut self.wasi
        }
        fn unwind_hooks(&self) -> Option<crate::wasi::UnwindHooks> {
            self.hooks.clone()
        }
    }

    /// Through the host's linker, an instrumented guest blocked in
    /// `memory.atomic.wait32` is woken by a notify from another thread,
    /// unwinds when the host interrupts it, and traps on a misaligned
    /// address as the instruction would.
    #[test]
    fn an_instrumented_wait_is_woken_by_notify_and_unwinds_when_interrupted() {
        use upstare_instrument::abi::{self, exports};
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
        let (futexes, handle) = (wasi.futexes(), wasi.interrupter().handle());
        let mut store = wasmtime::Store::new(&engine, Store { wasi, hooks: None });
        let mut linker = wasmtime::Linker::new(&engine);
        crate::wasi::add_to_linker(&mut linker).unwrap();
        add_to_linker(&mut linker).unwrap();
        let memory = ProgramMemory::new(&engine, &out.metadata.memory).unwrap();
        let control = crate::pause::ControlMemory::new(&engine, abi::control::Header::default()).unwrap();
        linker.define(&store, abi::IMPORT_MODULE, abi::MEMORY_IMPORT, memory.shared().clone()).unwrap();
        linker.define(&store, abi::IMPORT_MODULE, abi::CONTROL_IMPORT, control.memory().clone()).unwrap();
        let instance = linker.instantiate(&mut store, &module).unwrap();
        let unwind_state = crate::unwind_state::UnwindState::of(&mut store, &instance, control.clone(), true).unwrap();
        store.data_mut().hooks = Some(crate::wasi::UnwindHooks { state: unwind_state.clone() });
        instance.get_typed_func::<(), ()>(&mut store, exports::INIT_MEMORY).unwrap().call(&mut store, ()).unwrap();
        let wait = instance.get_typed_func::<i32, i32>(&mut store, "wait").unwrap();

        // Woken: the instruction's 0, and the guest runs on normally.
        let notifier = {
            let futexes = futexes.clone();
            std::thread::spawn(move || {
                until_waiting_at(&futexes, 68, 1);
                futexes.notify(68, 1)
            })
        };
        assert_eq!(wait.call(&mut store, 64).unwrap(), 0);
        assert_eq!(notifier.join().unwrap(), 1);
        assert!(unwind_state.is(&mut store, State::Normal));

        // Interrupted: the guest unwinds from the wait, and nobody waits.
        let interrupter = {
            let futexes = futexes.clone();
            std::thread::spawn(move || {
                until_waiting_at(&futexes, 68, 1);
                handle.interrupt();
            })
        };
        wait.call(&mut store, 64).unwrap();
        interrupter.join().unwrap();
        assert!(unwind_state.is(&mut store, State::Unwinding));
        assert!(futexes.table().is_empty());

        // A misaligned address traps as the instruction would.
        unwind_state.stop_unwind(&mut store).unwrap();
        let trap = wait.call(&mut store, 65).unwrap_err();
        assert_eq!(trap.downcast_ref::<Trap>(), Some(&Trap::HeapMisaligned), "{trap:?}");
    }
}
