//! Updates at update points the host picks, as a diagnostic: with
//! `--stress-update N` the guest is updated to its own module at every Nth
//! update point it reaches, every function treated as changed, so every
//! frame on the stack moves by the rules for changed code (what its values
//! mean), not as it is; with `--update-at K:MODULE` it is updated once, at
//! its Kth update point, to another build of the same program (the same
//! source at another optimisation level: every function differs in code,
//! none in meaning).
//!
//! Either way the program must print what an uninterrupted run prints: an
//! applied update that changes the output is a bug in UpStare. A point
//! where a frame cannot move yet is not an error; it is counted, with its
//! reason, and the old version runs on ([`Tally`]). An update that was
//! rolled back, or an internal error, ends the run: each is a bug to see.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::fresh::FreshAreas;
use crate::update::{self, Prepared, RunningVersion, UpdateError};
use crate::Guest;

/// What the guest is updated to.
#[derive(Debug, Clone)]
pub enum Target {
    /// Its own module, at every stop (`--stress-update`).
    Itself,
    /// Another module, at the first stop only (`--update-at`).
    Module(PathBuf),
}

/// Where updates were tried, and how each went.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Update points the guest stopped at.
    pub points: u64,
    /// Updates applied with every frame moved where it stood.
    pub moved: u64,
    /// Updates applied with a frame gone back to its loop header.
    pub retreated: u64,
    /// Points where a frame could not move: the old version ran on.
    pub waited: u64,
    /// Points where the update was refused for another reason.
    pub refused: u64,
    /// Why, for waits and refusals: reason -> how many points.
    pub reasons: BTreeMap<String, u64>,
}

impl Tally {
    /// Applied updates.
    pub fn applied(&self) -> u64 {
        self.moved + self.retreated
    }

    /// The counts in one line, without the reasons.
    pub fn counts(&self) -> String {
        format!(
            "{} points: {} moved, {} retreated, {} waited, {} refused",
            self.points, self.moved, self.retreated, self.waited, self.refused
        )
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.counts())?;
        // The commonest reasons first: what to work on next.
        let mut reasons: Vec<(&String, &u64)> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (reason, n) in reasons.iter().take(REASONS_SHOWN) {
            write!(f, "\n  {n} x {reason}")?;
        }
        if reasons.len() > REASONS_SHOWN {
            write!(f, "\n  ... and {} more reasons", reasons.len() - REASONS_SHOWN)?;
        }
        Ok(())
    }
}

/// How many distinct reasons the summary lists.
const REASONS_SHOWN: usize = 5;

/// The updates of one run, applied by the guest thread at each stop.
pub struct StressUpdates {
    target: Target,
    /// The version running, once the first stop built it.
    current: Option<RunningVersion>,
    /// The update onto the running module, kept for the next stop
    /// ([`Target::Itself`] only: it does not change what runs).
    onto_itself: Option<Prepared>,
    fresh: FreshAreas,
    tally: Tally,
}

impl StressUpdates {
    /// Updates to `target` at each stop of the guest.
    pub fn new(target: Target) -> Self {
        StressUpdates { target, current: None, onto_itself: None, fresh: FreshAreas::default(), tally: Tally::default() }
    }

    /// What happened so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Updates `guest`, stopped at a stress point since `paused_at`, or
    /// counts why it cannot; an error is a failure to report, and the run
    /// should end.
    pub fn at_stop(&mut self, guest: &mut Guest, paused_at: Instant) -> Result<(), String> {
        self.tally.points += 1;
        if matches!(self.target, Target::Module(_)) {
            guest.end_stress();
        }
        let current = match &self.current {
            Some(c) => c.clone(),
            None => RunningVersion::initial(guest.module()).map_err(|e| e.to_string())?,
        };
        let prepared = match self.onto_itself.take() {
            Some(p) => Ok(p),
            None => self.prepare(guest, &current),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return self.count_failure(e),
        };
        let outcome = guest.apply_update(&current, &prepared, paused_at);
        match outcome {
            Ok(report) => {
                match report.retreated.0 {
                    0 => self.tally.moved += 1,
                    _ => self.tally.retreated += 1,
                }
                self.fresh.free(&report.freed);
                self.current = Some(prepared.next.clone());
            }
            Err(e) => {
                if let Some(area) = prepared.fresh {
                    self.fresh.release(area);
                }
                self.current = Some(current);
                self.count_failure(e)?;
            }
        }
        if matches!(self.target, Target::Itself) {
            self.onto_itself = Some(prepared);
        }
        Ok(())
    }

    fn prepare(&mut self, guest: &Guest, current: &RunningVersion) -> Result<Prepared, UpdateError> {
        let u = guest.unwinder.as_ref().ok_or(UpdateError::NotInstrumented)?;
        match &self.target {
            Target::Itself => update::prepare_onto_itself(guest.engine(), current, &u.memory, &u.control),
            Target::Module(path) => {
                let bytes =
                    std::fs::read(path).map_err(|e| UpdateError::BadInput(format!("cannot read {}: {e}", path.display())))?;
                update::prepare(guest.engine(), current, &u.memory, &mut self.fresh, &u.control, guest.first_process_of().as_deref(), path, bytes)
            }
        }
    }

    /// Counts a wait or a refusal; anything else is returned as the error
    /// that ends the run.
    fn count_failure(&mut self, e: UpdateError) -> Result<(), String> {
        match e {
            UpdateError::Frame(frame) => {
                self.tally.waited += 1;
                *self.tally.reasons.entry(frame.to_string()).or_default() += 1;
            }
            UpdateError::Refused(reason) => {
                self.tally.refused += 1;
                *self.tally.reasons.entry(reason).or_default() += 1;
            }
            UpdateError::NotInstrumented => {
                self.tally.refused += 1;
                *self.tally.reasons.entry("the module runs without instrumentation".into()).or_default() += 1;
            }
            UpdateError::Stale(stale) => {
                self.tally.refused += 1;
                *self.tally.reasons.entry(stale.to_string()).or_default() += 1;
            }
            e => return Err(e.to_string()),
        }
        Ok(())
    }
}
