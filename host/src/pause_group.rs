//! The instances of a program that pause with its main one: a
//! multi-threaded program's workers, a forking program's child processes.
//! Each runs on an OS thread of its own; the group asks them all to stop
//! at their next update point, knows which have parked there, hands their
//! guests to an update or a snapshot while they stay parked, and lets them
//! all run again at once.
//!
//! The main instance is the embedder's [`Guest`], outside the group: it
//! asks the group to pause when it pauses, waits for every member to park
//! ([`PauseGroup::wait_parked`]), and resumes the group when it resumes.
//! What a member does when it stops for another reason (a thread's exit
//! ends its program, a process's ends only itself) is its owner's
//! business, in [`crate::threads`] and [`crate::processes`].

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::interrupt::Broadcast;
use crate::threads::Stopper;
use crate::{Guest, GUEST_THREAD_STACK};

/// What a member is doing, as `status` and the pause see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Running guest code, or blocked in a call.
    Running,
    /// Unwound at an update point, waiting for the program to resume.
    Parked,
}

/// A member as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberStatus {
    pub(crate) id: u32,
    pub(crate) state: RunState,
    /// The function it stopped in, while parked.
    pub(crate) paused_in: Option<String>,
    /// The call that may block it, while it runs and is in one.
    pub(crate) in_call: Option<&'static str>,
}

struct Member {
    state: RunState,
    paused_in: Option<String>,
    /// Its guest: locked by its OS thread while it runs, by an update or a
    /// snapshot while it is parked.
    guest: Arc<Mutex<Guest>>,
    stopper: Stopper,
}

#[derive(Default)]
struct Members {
    by_id: BTreeMap<u32, Member>,
    /// Whether a pause is under way: a member started now starts with its
    /// request already posted.
    pausing: bool,
    /// Bumped at every resume; a parked member runs again when it changes.
    resumes: u64,
    /// Set when the program ends: parked members stop instead of resuming.
    over: bool,
}

/// The members of one program.
pub(crate) struct PauseGroup {
    members: Mutex<Members>,
    /// Where the main instance waits for every member to park; notified
    /// only when that may have become true (or the pause ended), so that
    /// 64 members parking one after another do not wake it 64 times.
    settled: Condvar,
    /// Where parked members wait for the resume; kept apart from `settled`
    /// because each park would otherwise wake every member already parked,
    /// a quadratic storm of wake-ups on a pause of many members.
    resumed: Condvar,
    /// One wake-up for every member's blocked call; `None` if its pipe
    /// could not be made, when each member is woken on its own.
    broadcast: Option<Arc<Broadcast>>,
}

impl Default for PauseGroup {
    fn default() -> Self {
        PauseGroup {
            members: Mutex::default(),
            settled: Condvar::new(),
            resumed: Condvar::new(),
            broadcast: Broadcast::new().ok(),
        }
    }
}

impl PauseGroup {
    fn members(&self) -> MutexGuard<'_, Members> {
        // Every change is a few assignments made without calling out; a
        // panic elsewhere cannot leave the members half changed.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many members are alive (parked or running).
    pub(crate) fn count(&self) -> usize {
        self.members().by_id.len()
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.members().by_id.contains_key(&id)
    }

    /// Where each member is, in id order.
    pub(crate) fn list(&self) -> Vec<MemberStatus> {
        self.members()
            .by_id
            .iter()
            .map(|(id, m)| MemberStatus {
                id: *id,
                state: m.state,
                paused_in: m.paused_in.clone().filter(|_| m.state == RunState::Parked),
                in_call: m.stopper.interrupt.current_call().filter(|_| m.state == RunState::Running),
            })
            .collect()
    }

    /// Registers `guest` as member `id`, running or parked, and starts its
    /// OS thread (named `name`), which runs `drive` once the member may run:
    /// at once, or for a parked one at the next resume. `drive` owns the
    /// member from then on and leaves the group with [`PauseGroup::leave`].
    pub(crate) fn start(
        self: &Arc<Self>,
        id: u32,
        name: String,
        guest: Guest,
        state: RunState,
        drive: impl FnOnce(Arc<Mutex<Guest>>) + Send + 'static,
    ) -> Result<(), String> {
        let stopper = guest.stopper();
        // Only a member that can pause is ever asked through it; another
        // would find it readable, with nothing pending, until it settles.
        if let (Some(b), Some(_)) = (&self.broadcast, &stopper.control) {
            stopper.interrupt.join(b);
        }
        let paused_in = guest.paused_in();
        let guest = Arc::new(Mutex::new(guest));
        let resumes = {
            let mut m = self.members();
            if m.by_id.contains_key(&id) {
                return Err(format!("{id} is recorded twice"));
            }
            if m.pausing && state == RunState::Running {
                stopper.ask();
            }
            m.by_id.insert(id, Member { state, paused_in, guest: guest.clone(), stopper });
            m.resumes
        };
        let group = self.clone();
        let started = std::thread::Builder::new().name(name).stack_size(GUEST_THREAD_STACK).spawn(move || {
            if state == RunState::Parked && !group.park_since(id, Some(resumes)) {
                group.leave(id);
                return;
            }
            drive(guest)
        });
        if let Err(e) = started {
            self.members().by_id.remove(&id);
            return Err(format!("cannot start an OS thread: {e}"));
        }
        Ok(())
    }

    /// Takes member `id` out of the group: it has ended.
    pub(crate) fn leave(&self, id: u32) {
        let mut m = self.members();
        m.by_id.remove(&id);
        self.notify_if_settled(&m);
    }

    /// Parks a paused member until the program resumes (true) or ends
    /// (false); `paused_in` is where it stopped, for `status`.
    pub(crate) fn park(&self, id: u32, paused_in: Option<String>) -> bool {
        if let Some(member) = self.members().by_id.get_mut(&id) {
            member.paused_in = paused_in;
        }
        self.park_since(id, None)
    }

    /// [`PauseGroup::park`] until the program resumes after resume number
    /// `resumes` (a member started parked must not miss a resume that came
    /// before its OS thread ran), or after the current one.
    fn park_since(&self, id: u32, resumes: Option<u64>) -> bool {
        let mut m = self.members();
        if resumes.is_none() && !m.pausing {
            // The pause it stopped for was withdrawn, or the program has
            // resumed since: it runs on.
            return !m.over;
        }
        let resumes = resumes.unwrap_or(m.resumes);
        if let Some(member) = m.by_id.get_mut(&id) {
            member.state = RunState::Parked;
        }
        self.notify_if_settled(&m);
        while m.resumes == resumes && !m.over {
            m = self.resumed.wait(m).unwrap_or_else(PoisonError::into_inner);
        }
        if let Some(member) = m.by_id.get_mut(&id) {
            member.state = RunState::Running;
        }
        !m.over
    }

    /// Asks every member that is not parked already to pause (the main
    /// instance is asked by the caller). A parked member has served its
    /// request; asking it again would stop it once more right after the
    /// resume, with nobody to resume it.
    ///
    /// Asked once per pause: the main instance, stopping, asks again only
    /// for a pause nobody requested (a stress stop). The asks, a system
    /// call each, are made outside the lock, which the members they wake
    /// need in order to park. A member started meanwhile is asked by
    /// [`PauseGroup::start`]; one asked after the pause was withdrawn runs
    /// on ([`PauseGroup::park_since`]).
    pub(crate) fn request_pause(&self) {
        let stoppers: Vec<Stopper> = {
            let mut m = self.members();
            if m.pausing {
                return;
            }
            m.pausing = true;
            m.by_id.values().filter(|x| x.state != RunState::Parked && x.stopper.control.is_some()).map(|x| x.stopper.clone()).collect()
        };
        match &self.broadcast {
            Some(b) => {
                for stopper in &stoppers {
                    stopper.post();
                }
                b.wake();
            }
            None => stoppers.iter().for_each(Stopper::ask),
        }
    }

    /// Withdraws a pause request, and lets members that parked for it run
    /// on: the main instance did not pause in time, and would not resume
    /// them. (If it pauses after all, it asks them again.)
    pub(crate) fn cancel_pause(&self) {
        let mut m = self.members();
        m.pausing = false;
        for x in m.by_id.values().filter(|x| x.stopper.control.is_some()) {
            x.stopper.withdraw();
        }
        // A main instance waiting for the members to park stops waiting.
        self.settled.notify_all();
        if let Some(b) = &self.broadcast {
            b.settle();
        }
        if m.by_id.values().any(|x| x.state == RunState::Parked) {
            m.resumes += 1;
            for x in m.by_id.values_mut() {
                x.state = RunState::Running;
            }
            self.resumed.notify_all();
        }
    }

    /// Waits until every member is parked, the program ends, or the pause
    /// is withdrawn ([`PauseGroup::cancel_pause`]). Returns whether all are
    /// parked.
    pub(crate) fn wait_parked(&self) -> bool {
        let mut m = self.members();
        loop {
            if m.over || !m.pausing {
                return false;
            }
            if all_parked(&m) {
                return true;
            }
            m = self.settled.wait(m).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The parked members' guests, in id order, for an update or a
    /// snapshot of the paused program. Lock each only while the program
    /// stays paused.
    pub(crate) fn parked(&self) -> Vec<(u32, Arc<Mutex<Guest>>)> {
        let m = self.members();
        m.by_id.iter().filter(|(_, x)| x.state == RunState::Parked).map(|(id, x)| (*id, x.guest.clone())).collect()
    }

    /// Lets every parked member run again.
    pub(crate) fn resume(&self) {
        let mut m = self.members();
        m.pausing = false;
        if let Some(b) = &self.broadcast {
            b.settle();
        }
        m.resumes += 1;
        // Running from now on, before their OS threads wake: a request that
        // comes first must ask them too.
        for x in m.by_id.values_mut() {
            x.state = RunState::Running;
        }
        self.resumed.notify_all();
    }

    /// The program has ended: asks every member to stop, and parked ones
    /// stop instead of resuming. Returns false if it had ended already.
    pub(crate) fn end(&self) -> bool {
        let stoppers: Vec<Stopper> = {
            let mut m = self.members();
            if m.over {
                return false;
            }
            m.over = true;
            m.by_id.values().map(|x| x.stopper.clone()).collect()
        };
        for stopper in &stoppers {
            stopper.ask();
        }
        self.settled.notify_all();
        self.resumed.notify_all();
        true
    }

    /// Wakes a main instance waiting in [`PauseGroup::wait_parked`] if every
    /// member is now parked.
    fn notify_if_settled(&self, m: &Members) {
        if all_parked(m) {
            self.settled.notify_all();
        }
    }
}

/// Locks a member's guest. A member's OS thread that panicked left its
/// guest as its last call did; an update or a snapshot reads and replaces
/// it whole.
pub(crate) fn lock(guest: &Mutex<Guest>) -> MutexGuard<'_, Guest> {
    guest.lock().unwrap_or_else(PoisonError::into_inner)
}

fn all_parked(m: &Members) -> bool {
    m.by_id.values().all(|x| x.state == RunState::Parked)
}
