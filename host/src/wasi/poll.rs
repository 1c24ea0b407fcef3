//! `poll_oneoff`: waiting on clocks, files, stdio and sockets together.
//!
//! Subscriptions that are ready by nature (regular files, directories,
//! stdout) produce events at once; sockets, pipes and stdin are waited on
//! with one `poll(2)` through the interrupter, bounded by the earliest
//! clock. A call with only a clock is how wasi-libc sleeps, so sleeping is
//! interruptible too.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::abi::{eventtype, layout, Errno, EVENT_FD_READWRITE_HANGUP, SUBCLOCK_ABSTIME};
use super::fd_table::{Descriptor, Object};
use super::memory::GuestMemory;
use super::proc::now_ns;
use super::{pipe, CallError, CallResult, WasiCtx};
use crate::interrupt::{Interest, Wait};

/// One parsed subscription.
enum Sub {
    Clock { deadline: Instant },
    Fd { desc: Descriptor, interest: Interest },
    /// A subscription that fails at once with this errno.
    Failed(Errno),
}

/// One event to report.
struct Event {
    userdata: u64,
    error: Errno,
    kind: u8,
    nbytes: u64,
    hangup: bool,
}

impl Event {
    /// An event that reports only its outcome: a clock, an object ready by
    /// nature, or a subscription that failed.
    fn outcome(userdata: u64, kind: u8, error: Errno) -> Event {
        Event { userdata, error, kind, nbytes: 0, hangup: false }
    }
}

fn parse(ctx: &WasiCtx, mem: &GuestMemory<'_>, at: u32) -> CallResult<(u64, u8, Sub)> {
    let userdata = mem.read_u64(at)?;
    let tag = mem.read_u8(at + 8)?;
    let sub = match tag {
        eventtype::CLOCK => {
            let id = mem.read_u32(at + 16)?;
            let timeout = mem.read_u64(at + 24)?;
            let flags = mem.read_u16(at + 40)?;
            let wait_ns = if flags & SUBCLOCK_ABSTIME != 0 {
                match now_ns(id) {
                    Ok(now) => timeout.saturating_sub(now),
                    Err(e) => return Ok((userdata, tag, Sub::Failed(e))),
                }
            } else {
                timeout
            };
            // Saturate far-future timeouts instead of overflowing `Instant`.
            let wait = Duration::from_nanos(wait_ns.min(u64::MAX / 4));
            let deadline = Instant::now()
                .checked_add(wait)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
            Sub::Clock { deadline }
        }
        eventtype::FD_READ | eventtype::FD_WRITE => {
            let fd = mem.read_u32(at + 16)?;
            let interest = if tag == eventtype::FD_READ { Interest::Read } else { Interest::Write };
            match ctx.fds.get(fd) {
                Ok(desc) => Sub::Fd { desc: desc.clone(), interest },
                Err(e) => Sub::Failed(e),
            }
        }
        _ => return Err(Errno::INVAL.into()),
    };
    Ok((userdata, tag, sub))
}

/// When a subscription can be ready.
enum Readiness<'a> {
    /// Now: the object is always ready.
    Now,
    /// When this host descriptor is.
    On(BorrowedFd<'a>),
    /// Not yet, and there is no descriptor to wait on: a FIFO writer whose
    /// first reader has not come ([`pipe::try_connect`] again later).
    Later,
}

fn readiness(desc: &Descriptor, interest: Interest) -> CallResult<Readiness<'_>> {
    Ok(match (&desc.object, interest) {
        (Object::Std(s), Interest::Read) => Readiness::On(s.host_fd()),
        (Object::Listener(l), _) => Readiness::On(l.socket.as_fd()),
        (Object::Stream(s), _) => Readiness::On(s.socket.as_fd()),
        (Object::Pipe(p), _) => match pipe::try_connect(p)? {
            Some(file) => Readiness::On(file.as_fd()),
            None => Readiness::Later,
        },
        _ => Readiness::Now,
    })
}

/// `poll_oneoff`
pub fn poll_oneoff(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, subs_ptr: u32, events_ptr: u32, count: u32, out: u32) -> CallResult {
    if count == 0 {
        return Err(Errno::INVAL.into());
    }
    // No capacity from `count`: it is the guest's word, and a huge one must
    // end in EFAULT at the first subscription past memory, not in an
    // allocation the host cannot make.
    let mut subs = Vec::new();
    for i in 0..count {
        let at = i
            .checked_mul(layout::SUBSCRIPTION_SIZE)
            .and_then(|off| subs_ptr.checked_add(off))
            .ok_or(Errno::FAULT)?;
        subs.push(parse(ctx, mem, at)?);
    }

    let mut events = Vec::new();
    let mut waits: Vec<(BorrowedFd<'_>, Interest)> = Vec::new();
    let mut wait_owner: Vec<usize> = Vec::new();
    let mut later: Vec<usize> = Vec::new();
    let mut deadline: Option<Instant> = None;
    for (i, (userdata, kind, sub)) in subs.iter().enumerate() {
        match sub {
            Sub::Failed(error) => events.push(Event::outcome(*userdata, *kind, *error)),
            Sub::Clock { deadline: d } => deadline = Some(deadline.map_or(*d, |cur: Instant| cur.min(*d))),
            Sub::Fd { desc, interest } => match readiness(desc, *interest) {
                Ok(Readiness::On(fd)) => {
                    waits.push((fd, *interest));
                    wait_owner.push(i);
                }
                Ok(Readiness::Later) => later.push(i),
                Ok(Readiness::Now) => events.push(Event::outcome(*userdata, *kind, Errno::SUCCESS)),
                Err(CallError::Errno(error)) => events.push(Event::outcome(*userdata, *kind, error)),
                Err(e) => return Err(e),
            },
        }
    }
    // Something is ready already: only collect what else is ready now.
    // A call interrupted by a pause is made again, with the same arguments,
    // when the guest resumes: its timeouts count from the first attempt, or
    // a relative sleep would start over at every pause and, under repeated
    // pauses, never end.
    let raw = mem.read(subs_ptr, count.saturating_mul(layout::SUBSCRIPTION_SIZE))?;
    if let Some((previous, resumed)) = ctx.interrupted_poll.take() {
        if previous == raw {
            deadline = resumed;
        }
    }
    if !events.is_empty() {
        deadline = Some(Instant::now());
    }
    let ready = loop {
        let until = match later.is_empty() {
            true => deadline,
            false => {
                let retry = Instant::now() + pipe::CONNECT_RETRY;
                Some(deadline.map_or(retry, |d| d.min(retry)))
            }
        };
        match ctx.interrupter.wait(&waits, until)? {
            Wait::Interrupted => {
                ctx.interrupted_poll = Some((raw, deadline));
                return Err(CallError::Interrupted);
            }
            Wait::Ready(ready) => break ready,
            Wait::TimedOut if deadline.is_some_and(|d| Instant::now() >= d) => break Vec::new(),
            Wait::TimedOut => {
                // A pending writer whose reader came is writable now.
                let mut connected = false;
                for &i in &later {
                    let (userdata, kind, sub) = &subs[i];
                    let Sub::Fd { desc: Descriptor { object: Object::Pipe(p), .. }, .. } = sub else { continue };
                    let error = match pipe::try_connect(p) {
                        Ok(None) => continue,
                        Ok(Some(_)) => Errno::SUCCESS,
                        Err(e) => e.into(),
                    };
                    events.push(Event::outcome(*userdata, *kind, error));
                    connected = true;
                }
                if connected {
                    break Vec::new();
                }
            }
        }
    };
    for (index, hangup) in ready {
        let (userdata, kind, _) = &subs[wait_owner[index]];
        let nbytes = if *kind == eventtype::FD_READ {
            rustix::io::ioctl_fionread(waits[index].0).unwrap_or(0)
        } else {
            0
        };
        events.push(Event { userdata: *userdata, error: Errno::SUCCESS, kind: *kind, nbytes, hangup });
    }
    let now = Instant::now();
    for (userdata, kind, sub) in &subs {
        if let Sub::Clock { deadline } = sub {
            if *deadline <= now {
                events.push(Event::outcome(*userdata, *kind, Errno::SUCCESS));
            }
        }
    }

    for (i, ev) in events.iter().enumerate() {
        let mut buf = [0u8; layout::EVENT_SIZE as usize];
        buf[0..8].copy_from_slice(&ev.userdata.to_le_bytes());
        buf[8..10].copy_from_slice(&ev.error.0.to_le_bytes());
        buf[10] = ev.kind;
        buf[16..24].copy_from_slice(&ev.nbytes.to_le_bytes());
        let flags = if ev.hangup { EVENT_FD_READWRITE_HANGUP } else { 0 };
        buf[24..26].copy_from_slice(&flags.to_le_bytes());
        mem.write(events_ptr + i as u32 * layout::EVENT_SIZE, &buf)?;
    }
    mem.write_u32(out, events.len() as u32)?;
    Ok(())
}
