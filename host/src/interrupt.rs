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
//! A futex wait (a thread of a wasi-threads program waiting on memory, see
//! [`crate::futex`]) has no descriptor to poll: it parks on a condition
//! variable instead ([`Interrupter::park`]), which a request wakes as well
//! as the pipe.
//!
//! The instances that pause with a program's main one (its threads, its
//! processes) also poll a pipe they share, a [`Broadcast`]: a pause posts
//! each one's request without a system call and wakes them all with one
//! write. Woken one write each, 64 of them took about 1 ms on two cores,
//! each woken instance running its unwind before the asking thread could
//! post the next request.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

/// The shared state behind an interrupter and its handles.
#[derive(Debug)]
struct Shared {
    pending: AtomicBool,
    wake_read: OwnedFd,
    wake_write: OwnedFd,
    /// Where a futex wait parks, with how many threads are parked there;
    /// locked around every wake-up so none falls between a parked thread's
    /// check and its wait, and read by it so that a wake-up with nobody
    /// parked makes no system call (a pause posts one to every member).
    parking: Mutex<usize>,
    unpark: Condvar,
    /// The call that may block the thread right now, for `status`.
    call: Mutex<Option<&'static str>>,
    /// The wake-up shared with the instances it pauses with, once it
    /// joins a [`crate::pause_group::PauseGroup`].
    group: OnceLock<Arc<Broadcast>>,
}

/// A wake-up pipe shared by the instances of a program that pause
/// together: one write wakes every one of them blocked in
/// [`Interrupter::wait`] or parked. Only those with a request posted
/// ([`InterruptHandle::post`]) stop blocking; the others wait on, until
/// the pipe is drained ([`Broadcast::settle`]).
#[derive(Debug)]
pub(crate) struct Broadcast {
    read: OwnedFd,
    write: OwnedFd,
}

impl Broadcast {
    pub(crate) fn new() -> std::io::Result<Arc<Self>> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)?;
        Ok(Arc::new(Broadcast { read, write }))
    }

    /// Wakes every member: those with a request posted stop blocking.
    pub(crate) fn wake(&self) {
        // A full pipe already holds a wake-up.
        let _ = rustix::io::write(&self.write, &[1]);
    }

    /// Drains the wake-up, so that members waiting again block again; done
    /// when none of them is left to act on it (all parked, or the pause
    /// withdrawn), since a member whose request is not pending would
    /// otherwise find the pipe readable at every poll.
    pub(crate) fn settle(&self) {
        let mut buf = [0u8; 64];
        while matches!(rustix::io::read(&self.read, &mut buf), Ok(n) if n > 0) {}
    }
}

/// Marks a thread as in a call that may block until dropped
/// ([`Interrupter::enter`]).
#[must_use]
pub struct InCall {
    shared: Arc<Shared>,
}

impl Drop for InCall {
    fn drop(&mut self) {
        *self.shared.call.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// How a [`Interrupter::park`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// What it waited for happened.
    Woken,
    /// The deadline passed.
    TimedOut,
    /// The host asked the guest to stop blocking (the request is left
    /// pending for the caller to take or keep).
    Interrupted,
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
                parking: Mutex::new(0),
                unpark: Condvar::new(),
                call: Mutex::new(None),
                group: OnceLock::new(),
            }),
        })
    }

    /// A handle other threads use to interrupt this guest.
    pub fn handle(&self) -> InterruptHandle {
        InterruptHandle {
            shared: self.shared.clone(),
        }
    }

    /// Records that the thread is in `call`, which may block, until the
    /// returned guard is dropped.
    pub fn enter(&self, call: &'static str) -> InCall {
        *self.shared.call.lock().unwrap_or_else(PoisonError::into_inner) = Some(call);
        InCall { shared: self.shared.clone() }
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

    /// Posts again a request [`Interrupter::wait`] took but the call could
    /// not serve (it had already done part of its work, and returns that).
    pub fn repost(&self) {
        self.handle().interrupt();
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
            if let Some(group) = self.shared.group.get() {
                set.push(PollFd::from_borrowed_fd(group.read.as_fd(), PollFlags::IN));
            }
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

    /// Parks until `woken` says so (checked whenever [`Interrupter::unpark`]
    /// or a request wakes the thread), `deadline` passes, or the host
    /// interrupts.
    pub fn park(&self, deadline: Option<Instant>, woken: impl Fn() -> bool) -> Parked {
        let shared = &self.shared;
        let mut guard = shared.parking.lock().unwrap_or_else(PoisonError::into_inner);
        *guard += 1;
        let outcome = loop {
            if woken() {
                break Parked::Woken;
            }
            if shared.pending.load(Ordering::Acquire) {
                break Parked::Interrupted;
            }
            guard = match deadline {
                None => shared.unpark.wait(guard).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break Parked::TimedOut;
                    }
                    shared.unpark.wait_timeout(guard, left).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        };
        *guard -= 1;
        outcome
    }

    /// Wakes this interrupter's thread if it is parked, to check what it
    /// waits for.
    pub fn unpark(&self) {
        unpark(&self.shared);
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
        unpark(&self.shared);
    }

    /// The call that may block the guest's thread, if it is in one now.
    pub fn current_call(&self) -> Option<&'static str> {
        *self.shared.call.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Withdraws a request the guest has not taken yet. (A wake-up byte
    /// left in the pipe only makes one wait look once more.)
    pub fn withdraw(&self) {
        self.shared.pending.store(false, Ordering::Release);
    }

    /// Posts a request and wakes a parked wait, but leaves a blocked
    /// `poll` to the group's [`Broadcast`], which the caller wakes once for
    /// all its members.
    pub(crate) fn post(&self) {
        self.shared.pending.store(true, Ordering::Release);
        unpark(&self.shared);
    }

    /// Joins `group`: waits also wake when it is woken.
    pub(crate) fn join(&self, group: &Arc<Broadcast>) {
        // An instance belongs to one program for its whole life.
        let _ = self.shared.group.set(group.clone());
    }
}

fn unpark(shared: &Shared) {
    // Taking the lock orders this wake-up after a parked thread's check or
    // before it: never between its check and its wait.
    let parked = *shared.parking.lock().unwrap_or_else(PoisonError::into_inner);
    if parked > 0 {
        shared.unpark.notify_all();
    }
}
