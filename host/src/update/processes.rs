//! The other processes of a program that forks, in an update. Each has its
//! own memory with the same layout, so the one prepared update applies to
//! each as to the first: its frames mapped from its own stack, patchgen's
//! checks of what it holds, its heap converted, its instance replaced and
//! its frames rewound into the new code. The first process moves first;
//! each other process moves inside the step before it, so that one the new
//! code does not accept unwinds every move made before it, the first's
//! included: all processes move, or none.
//!
//! The fresh area was placed above the memory of every process at the
//! prepare ([`crate::fresh::FreshAreas::reserve`]); each process grows its
//! memory to cover it here. One that grew past the area's start since the
//! prepare may keep heap there, and the update is refused.

use std::sync::{Arc, Mutex};

use upstare_instrument::Metadata;
use wasmtime::InstancePre;

use super::{instrumented, ApplyError, Prepared, ProcessPlan, RunningVersion, UpdateError};
use crate::fresh::{unreferenced as unreferenced_in, Area};
use crate::pause_group::lock;
use crate::process::{link_memories, ProcessState};
use crate::processes::Processes;
use crate::program_memory::{ProgramMemory, PAGE};
use crate::Guest;

/// A parked process and how it moves.
pub(super) struct ProcessStep {
    pid: u32,
    guest: Arc<Mutex<Guest>>,
    plan: ProcessPlan,
    /// The new module linked against this process's memories.
    instance_pre: InstancePre<ProcessState>,
}

/// Plans the move of every parked process of `program` but the first.
pub(super) fn plan(
    program: &Processes,
    current: &RunningVersion,
    prepared: &Prepared,
    new_meta: &Arc<Metadata>,
) -> Result<Vec<ProcessStep>, UpdateError> {
    let parked = program.parked();
    let running = program.children();
    if parked.len() != running {
        return Err(UpdateError::Refused(format!("{} of the program's processes did not pause", running - parked.len().min(running))));
    }
    let mut planned = Vec::with_capacity(parked.len());
    for (pid, guest) in parked {
        let plan = lock(&guest).plan_update(current, prepared, new_meta).map_err(|e| in_process(pid, e))?;
        planned.push((pid, guest, plan));
    }
    // Every process can move: only now does each grow its memory, so that
    // a refusal above, which the updater may try again, grows nothing.
    let mut steps = Vec::with_capacity(planned.len());
    for (pid, guest, plan) in planned {
        let mut g = lock(&guest);
        let (memory, control) = {
            let u = instrumented(&mut g.unwinder).map_err(|_| UpdateError::NotInstrumented)?;
            (u.memory.clone(), u.control.clone())
        };
        if let Some(area) = prepared.fresh {
            make_room(pid, &memory, area, prepared)?;
        }
        let mut linker = program.imports();
        let instance_pre = link_memories(&mut g.store, &mut linker, &memory, &control)
            .and_then(|()| linker.instantiate_pre(prepared.next.module.module()))
            .map_err(|e| UpdateError::RolledBack(ApplyError::Process { pid, source: Box::new(ApplyError::Link(e)) }))?;
        drop(g);
        steps.push(ProcessStep { pid, guest, plan, instance_pre });
    }
    Ok(steps)
}

/// Grows `memory` to hold the fresh area, or refuses if the process has
/// grown past its start since the update was prepared.
fn make_room(pid: u32, memory: &ProgramMemory, area: Area, prepared: &Prepared) -> Result<(), UpdateError> {
    let end = u64::from(area.base) + u64::from(area.len);
    let size = memory.size();
    if size <= u64::from(area.base) {
        return memory
            .grow((end - size).div_ceil(PAGE))
            .map(drop)
            .map_err(|e| UpdateError::Refused(format!("process {pid} cannot grow its memory for the new version: {e}")));
    }
    // A process forked since the prepare copied its memory from one that
    // held the area then (the first process, or one refused here).
    if prepared.processes_at_prepare.contains(&pid) {
        return Err(UpdateError::Refused(format!(
            "process {pid} grew its memory past {:#x}, where the new version's fresh data was to go, while the update was prepared",
            area.base
        )));
    }
    Ok(())
}

/// Names the process a refusal is about.
fn in_process(pid: u32, e: UpdateError) -> UpdateError {
    match e {
        UpdateError::Frame(mut unmappable) => {
            unmappable.reason = format!("{} (in process {pid})", unmappable.reason);
            UpdateError::Frame(unmappable)
        }
        UpdateError::Refused(reason) => UpdateError::Refused(format!("process {pid}: {reason}")),
        other => other,
    }
}

/// Moves every planned process to the new version, each inside the move of
/// the one before, so that a failure undoes all of them.
pub(super) fn apply(steps: &[ProcessStep], prepared: &Prepared, new_meta: &Arc<Metadata>) -> Result<(), ApplyError> {
    let Some((step, rest)) = steps.split_first() else { return Ok(()) };
    let mut g = lock(&step.guest);
    match g.apply_plan(prepared, &step.instance_pre, &step.plan, new_meta, |_| apply(rest, prepared, new_meta)) {
        Ok(_) => Ok(()),
        // A later process's failure, already named.
        Err(e @ ApplyError::Process { .. }) => Err(e),
        Err(e) => Err(ApplyError::Process { pid: step.pid, source: Box::new(e) }),
    }
}

/// The retired areas `candidates` (unreferenced in the first process) that
/// no other process references either, after the move.
pub(super) fn unreferenced(steps: &[ProcessStep], mut candidates: Vec<Area>, prepared: &Prepared) -> Vec<Area> {
    for step in steps {
        if candidates.is_empty() {
            break;
        }
        let mut g = lock(&step.guest);
        let sp = g.stack_pointer(&prepared.next.version);
        let Ok(u) = instrumented(&mut g.unwinder) else { return Vec::new() };
        candidates = unreferenced_in(&candidates, &step.plan.stack.frames, &prepared.next.version, &u.memory, sp);
    }
    candidates
}
