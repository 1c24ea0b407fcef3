//! Waking a guest that is blocked in a host call, from any thread.
//!
//! Every WASI call that can block waits through [`Interrupter::wait`]: one
//! `poll(2)` over the host descriptors it needs and the read end of a pipe
//! that [`InterruptHandle::interrupt`] writes to. A request therefore reaches
//! a blocked call within one wake-up of the kernel, not after a polling
//! period, and the call returns [`Wait::Interrupted`], which the WASI layer
//! reports as its own outcome (never as an errno the guest could see). The
//! pause machinery turns that outcome into an update point.
//!
//! A request that arrives while the guest is not blocked stays pending and is
//! taken by the next blocking call, so none is lost in the race between
//! "about to block" and "blocked".
//!
//! A futex wait ([`crate::futex`]) waits on no descriptor: it parks on a
//! condition variable, [`Interrupter::park_until`], which both a request and
//! a notify ([`Waker`]) wake.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

/// The shared state behind an interrupter and its handles.
#[derive(Debug)]
struct Shared {
    pending: AtomicBool,
    wake_read: OwnedFd,
    wake_write: OwnedFd,
    /// Where a futex wait parks. Whoever wakes it changes what the waiter
    /// checks (the pending flag, its waiter's flag) first, then notifies
    /// with the lock held: the waiter checks under the lock, so a wake-up
    /// falls either before its check or after it sleeps, never between.
    parked: Mutex<()>,
    unpark: Condvar,
}

impl Shared {
    fn unpark(&self) {
        let _held = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.unpark.notify_all();
    }
}

/// Wakes the thread parked in [`Interrupter::park_until`] so it looks at
/// its condition again; `Send`, cloneable.
#[derive(Debug, Clone)]
pub struct Waker {
    shared: Arc<Shared>,
}

impl Waker {
    /// Wakes the parked thread, if any. Make its condition true first.
    pub fn wake(&self) {
        self.shared.unpark();
    }
}

/// How [`Interrupter::park_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// The condition held.
    Ready,
    /// A request is pending (left pending: the caller decides).
    Interrupted,
    /// The deadline passed.
    TimedOut,
}

/// Owned by a process's WASI context; blocking calls wait through it.
#[derive(Debug, Clone)]
pub struct Interrupter {
    shared: Arc<Shared>,
}

/// A cloneable, `Send` handle that interrupts the guest's current or next
/// blocking call.
#[derive(Debug, Clone)]
pub struct InterruptHandle {
    shared: Arc<Shared>,
}

/// What a host descriptor is waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Data to read, a connection to accept, or end of stream.
    Read,
    /// Room to write.
    Write,
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// These entries (indices into the waited set) are ready, each with
    /// whether the peer hung up.
    Ready(Vec<(usize, bool)>),
    /// The deadline passed with nothing ready.
    TimedOut,
    /// The host asked the guest to stop blocking.
    Interrupted,
}

impl Interrupter {
    /// Creates an interrupter with its wake-up pipe.
    pub fn new() -> std::io::Result<Self> {
        let (wake_read, wake_write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        Ok(Interrupter {
            shared: Arc::new(Shared {
                pending: AtomicBool::new(false),
                wake_read,
                wake_write,
                parked: Mutex::new(()),
                unpark: Condvar::new(),
            }),
        })
    }

    /// A handle other threads use to interrupt this guest.
    pub fn handle(&self) -> InterruptHandle {
        InterruptHandle {
            shared: self.shared.clone(),
        }
    }

    /// Takes a pending request, if any, clearing it.
    pub fn take_pending(&self) -> bool {
        if !self.shared.pending.swap(false, Ordering::AcqRel) {
            return false;
        }
        let mut buf = [0u8; 64];
        while matches!(rustix::io::read(&self.shared.wake_read, &mut buf), Ok(n) if n > 0) {}
        true
    }

    /// Waits until one of `fds` is ready, `deadline` passes, or the host
    /// interrupts. An empty `fds` with a deadline is a sleep; with no deadline
    /// it waits for an interruption only.
    pub fn wait(
        &self,
        fds: &[(BorrowedFd<'_>, Interest)],
        deadline: Option<Instant>,
    ) -> std::io::Result<Wait> {
        loop {
            if self.take_pending() {
                return Ok(Wait::Interrupted);
            }
            let mut set: Vec<PollFd<'_>> = fds
                .iter()
                .map(|(fd, interest)| {
                    let flags = match interest {
                        Interest::Read => PollFlags::IN,
                        Interest::Write => PollFlags::OUT,
                    };
                    PollFd::from_borrowed_fd(*fd, flags)
                })
                .collect();
            set.push(PollFd::from_borrowed_fd(
                self.shared.wake_read.as_fd(),
                PollFlags::IN,
            ));
            let timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(Instant::now());
                rustix::time::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: left.subsec_nanos() as i64,
                }
            });
            match rustix::event::poll(&mut set, timeout.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if self.take_pending() {
                return Ok(Wait::Interrupted);
            }
            let ready: Vec<(usize, bool)> = set[..fds.len()]
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.revents().is_empty())
                .map(|(i, p)| (i, p.revents().intersects(PollFlags::HUP)))
                .collect();
            if !ready.is_empty() {
                return Ok(Wait::Ready(ready));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Wait::TimedOut);
            }
        }
    }

    /// A waker for the thread that parks through this interrupter.
    pub fn waker(&self) -> Waker {
        Waker { shared: self.shared.clone() }
    }

    /// Parks the calling thread until `ready()` holds (checked first, so a
    /// thread both woken and interrupted reports [`Parked::Ready`]), a
    /// request is pending, or `deadline` passes. `ready` is checked with
    /// the parking lock held: whoever makes it true then calls
    /// [`Waker::wake`].
    pub fn park_until(&self, deadline: Option<Instant>, ready: impl Fn() -> bool) -> Parked {
        let mut held = self.shared.parked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if ready() {
                return Parked::Ready;
            }
            if self.shared.pending.load(Ordering::Acquire) {
                return Parked::Interrupted;
            }
            held = match deadline {
                None => self.shared.unpark.wait(held).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Parked::TimedOut;
                    }
                    self.shared.unpark.wait_timeout(held, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    /// Sleeps for `duration` unless interrupted first.
    pub fn sleep(&self, duration: Duration) -> std::io::Result<Wait> {
        self.wait(&[], Some(Instant::now() + duration))
    }
}

impl InterruptHandle {
    /// Asks the guest to leave its current blocking call, or its next one.
    pub fn interrupt(&self) {
        self.shared.pending.store(true, Ordering::Release);
        // A full pipe already holds a wake-up; nothing more is needed.
        let _ = rustix::io::write(&self.shared.wake_write, &[1]);
        self.shared.unpark();
    }

    /// Withdraws a request the guest has not taken yet. (A wake-up byte
    /// left in the pipe only makes one wait look once more.)
    pub fn withdraw(&self) {
        self.shared.pending.store(false, Ordering::Release);
    }
}
