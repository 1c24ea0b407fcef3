//! The conservative scan for addresses that would point where nothing
//! will be once an update is done: a converted global's old copy (code
//! that names the global is relinked, but a pointer to its old place would
//! go on reading and writing the old copy), or the old place of a frame
//! variable that moves.
//!
//! The typed trace ([`super::trace`]) rewrites the pointers whose types it
//! knows and refuses the heap's untyped words that hold such an address;
//! this scan covers what it does not walk: every `i32` a paused frame
//! holds (locals and operands, typed or not), and every word of the
//! writable globals and of the live shadow stack, save the slots the trace
//! rewrites. An integer that merely looks like such an address refuses the
//! update too: the scan cannot tell.

use super::MemoryView;
use crate::version::Version;
use upstare_instrument::abi::{TypedFrame, Value};

/// Memory that may hold pointers, besides the frames' values.
#[derive(Debug, Clone)]
pub struct Holder {
    /// What it is, for messages: "global `x`", "the shadow stack".
    pub name: String,
    /// Where it starts.
    pub address: u32,
    /// Its size in bytes.
    pub size: u32,
}

/// Where `version` keeps values that may be pointers, besides its frames:
/// its writable globals, and the live part of the shadow stack (from
/// `stack_pointer` up to the stack's top).
pub fn pointer_holders(version: &Version, stack_pointer: Option<u32>) -> Vec<Holder> {
    let mut holders: Vec<Holder> = version
        .info
        .symbols
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_absolute())
        .filter_map(|(i, s)| {
            let d = s.data()?;
            let writable = version.info.segments.get(d.segment? as usize)?.writable;
            let address = version.layout.data.get(&(i as u32)).copied().unwrap_or(d.address);
            let name = format!("global `{}`", s.name.clone().unwrap_or_default());
            writable.then_some(Holder { name, address, size: d.size })
        })
        .collect();
    if let (Some(sp), Some(top)) = (stack_pointer, crate::paused::stack_top(version)) {
        holders.push(Holder { name: "the shadow stack".into(), address: sp, size: top.saturating_sub(sp) });
    }
    holders
}

/// Where a value that would go stale is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A value of a paused frame of this function (a local or an operand).
    Frame(String),
    /// A word of memory, named as its [`Holder`] is.
    Memory(String),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Frame(function) => write!(f, "a frame of `{function}`"),
            Place::Memory(name) => f.write_str(name),
        }
    }
}

/// The first value that `target` says points where nothing will be, in
/// `frames` (running `version`) or in `holders`, with what `target` says
/// it would point into. With `skip_targets`, words inside a target are
/// not read (a converted global's old copy is dropped, so what it holds
/// does not matter); words at the addresses in `rewritten` are pointers
/// the trace rewrites.
pub fn find_pointer<T>(
    frames: &[TypedFrame],
    version: &Version,
    memory: &dyn MemoryView,
    holders: &[Holder],
    target: &dyn Fn(u32) -> Option<T>,
    skip_targets: bool,
    rewritten: &std::collections::HashSet<u32>,
) -> Option<(Place, T)> {
    for frame in frames {
        for value in frame.locals.iter().flatten().chain(&frame.operands) {
            if let Value::I32(v) = value {
                if let Some(what) = target(*v as u32) {
                    return Some((Place::Frame(version.info.function_name(frame.func)), what));
                }
            }
        }
    }
    for h in holders.iter().filter(|h| !(skip_targets && target(h.address).is_some())) {
        // Unreadable means out of bounds: nothing there to point anywhere.
        for (here, value) in super::words(memory, h.address, h.size) {
            if (skip_targets && target(here).is_some()) || rewritten.contains(&here) {
                continue;
            }
            if let Some(what) = target(value) {
                return Some((Place::Memory(h.name.clone()), what));
            }
        }
    }
    None
}
