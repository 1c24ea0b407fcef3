//! Fresh memory: the areas of the program memory that updates reserve for
//! what a new version adds (its read-only data, its new globals, the new
//! copies of globals whose type changed), and their reuse.
//!
//! Wasm memory only grows, so without reuse every update would leave its
//! area behind for good: a server updated back and forth ten thousand times
//! would grow by ten thousand areas. Instead the updater keeps one small
//! list, [`FreshAreas`], of every area it ever grew memory for, each either
//! in use or free:
//!
//! - [`FreshAreas::reserve`] gives an update the smallest free area that
//!   fits (splitting off what it does not need), and grows memory only when
//!   none does;
//! - an update that is refused, rolled back or given up hands its area back
//!   with [`FreshAreas::release`]: nothing was written there that anything
//!   can reach (the old version never knew the address), so it is free at
//!   once and memory is as large as before the first such update;
//! - an area whose version no longer runs is *retired* when an update
//!   commits: the new layout places no symbol in it ([`FreshAreas::retiring`]).
//!   It is free only once nothing points into it. The new version's code
//!   cannot name it, but a frame, a global or the shadow stack may still
//!   hold the address of an old string literal or of a removed global.
//!   [`unreferenced`] looks for such values at the commit, while the guest
//!   is still paused, in the same places the converted-globals check looks
//!   (frames, writable globals, the live shadow stack; the heap is not
//!   searched, so as not to make the pause depend on the heap's size; large
//!   static arrays are read, though, at every update that retires an
//!   area). A retired area something points into stays in use and is
//!   checked again at the next update.
//!
//! Adjacent free areas merge, so versions of different sizes still fit.
//! Free areas are not cleared when freed but zeroed when reused, at the
//! pause, because a new version's zero-initialised globals rely on fresh
//! memory reading as zero.
//!
//! The list lives with the updater, not in snapshots: a program restored
//! from a snapshot taken after an update cannot be updated again (its layout
//! is not recorded, see [`crate::update::RunningVersion::initial`]), so it
//! never reserves fresh memory and has no use for the list.

use upstare_instrument::abi::TypedFrame;
use upstare_patchgen::version::Version;

use crate::program_memory::{ProgramMemory, PAGE};

/// A range of program memory an update reserved, in whole pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    /// First byte.
    pub base: u32,
    /// Length in bytes, a multiple of the page size.
    pub len: u32,
}

impl Area {
    fn end(&self) -> u64 {
        u64::from(self.base) + u64::from(self.len)
    }

    fn contains(&self, address: u32) -> bool {
        address >= self.base && u64::from(address) < self.end()
    }
}

/// Every fresh area of a program, in use or free, in address order.
#[derive(Debug, Default)]
pub struct FreshAreas {
    areas: Vec<(Area, bool)>,
}

/// Figures for `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FreshFigures {
    /// Bytes of fresh memory in use by a version or waiting for pointers to
    /// it to go.
    pub used: u64,
    /// Bytes free for the next update.
    pub free: u64,
}

impl FreshAreas {
    /// An area of at least `bytes` for an update: a free one if one fits,
    /// else new pages at the end of `memory`.
    ///
    /// A program of several processes passes `floor`, the largest memory of
    /// its other processes: each has its own heap above its data, which may
    /// lie where this process has a free area or its end, so the area is
    /// new pages at or above `floor`, which every process can grow to.
    pub fn reserve(&mut self, memory: &ProgramMemory, bytes: u32, floor: u64) -> Result<Area, String> {
        let len = u64::from(bytes).div_ceil(PAGE) * PAGE;
        let len = u32::try_from(len).map_err(|_| format!("{bytes} bytes of fresh memory do not fit in a 32-bit memory"))?;
        if floor > 0 {
            return self.grow_above(memory, len, floor);
        }
        let best = self
            .areas
            .iter()
            .enumerate()
            .filter(|(_, (a, free))| *free && a.len >= len)
            .min_by_key(|(_, (a, _))| a.len)
            .map(|(i, _)| i);
        if let Some(i) = best {
            let (area, _) = self.areas[i];
            let taken = Area { base: area.base, len };
            self.areas[i] = (taken, false);
            if area.len > len {
                self.areas.insert(i + 1, (Area { base: area.base + len, len: area.len - len }, true));
            }
            return Ok(taken);
        }
        self.grow_above(memory, len, 0)
    }

    /// New pages for an area of `len` bytes at the end of `memory`, and at
    /// or above `floor`; the pages between are left unused.
    fn grow_above(&mut self, memory: &ProgramMemory, len: u32, floor: u64) -> Result<Area, String> {
        let floor = floor.div_ceil(PAGE) * PAGE;
        let gap = floor.saturating_sub(memory.size());
        let pages = (gap + u64::from(len)) / PAGE;
        // The guest may grow memory meanwhile: the area starts where this
        // growth does, or at the floor if that is higher.
        let start = memory.grow(pages).map_err(|e| format!("cannot reserve {pages} pages of memory for the new version: {e}"))?;
        let base = start.max(floor);
        let base = u32::try_from(base).ok().filter(|b| u64::from(*b) + u64::from(len) <= 1 << 32).ok_or("memory is full")?;
        let area = Area { base, len };
        // The guest grows memory too, so a new area lies above every other.
        self.areas.push((area, false));
        Ok(area)
    }

    /// Marks `area` free again: its update did not happen.
    pub fn release(&mut self, area: Area) {
        self.free(&[area]);
    }

    /// Marks `areas` free: nothing uses or points into them any more.
    pub fn free(&mut self, areas: &[Area]) {
        for (a, free) in &mut self.areas {
            if areas.contains(a) {
                *free = true;
            }
        }
        self.merge();
    }

    /// The areas in use that `next` (a version with its final layout) no
    /// longer places anything in, besides `reserved`, its own: free once
    /// nothing points into them.
    pub fn retiring(&self, next: &Version, reserved: Option<Area>) -> Vec<Area> {
        let placed: Vec<u32> = next
            .layout
            .data
            .iter()
            .filter(|(i, _)| next.info.symbols.get(**i as usize).is_some_and(|s| !s.is_absolute()))
            .map(|(_, address)| *address)
            .collect();
        self.areas
            .iter()
            .filter(|(a, free)| !free && Some(*a) != reserved && !placed.iter().any(|p| a.contains(*p)))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Bytes in use and free.
    pub fn figures(&self) -> FreshFigures {
        let mut figures = FreshFigures::default();
        for (a, free) in &self.areas {
            match free {
                true => figures.free += u64::from(a.len),
                false => figures.used += u64::from(a.len),
            }
        }
        figures
    }

    fn merge(&mut self) {
        let mut merged: Vec<(Area, bool)> = Vec::with_capacity(self.areas.len());
        for &(a, free) in &self.areas {
            match merged.last_mut() {
                Some((last, true)) if free && last.end() == u64::from(a.base) => last.len += a.len,
                _ => merged.push((a, free)),
            }
        }
        self.areas = merged;
    }
}

/// The `candidates` nothing points into: no i32 in `frames`, and no aligned
/// word of `running`'s writable globals or of the live shadow stack (from
/// `stack_pointer` up), holds an address inside them. A candidate that is
/// pointed into is live, and so are the candidates its own words point into.
pub fn unreferenced(
    candidates: &[Area],
    frames: &[TypedFrame],
    running: &Version,
    memory: &ProgramMemory,
    stack_pointer: Option<u32>,
) -> Vec<Area> {
    let ranges: Vec<(u32, u32)> = candidates.iter().map(|a| (a.base, a.len)).collect();
    upstare_patchgen::paused::unreferenced(&ranges, frames, running, memory, stack_pointer)
        .into_iter()
        .map(|(base, len)| Area { base, len })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn areas(list: &[(u32, u32, bool)]) -> FreshAreas {
        let areas = list.iter().map(|&(base, pages, free)| (Area { base: base * PAGE as u32, len: pages * PAGE as u32 }, free)).collect();
        FreshAreas { areas }
    }

    fn memory(pages: u32) -> ProgramMemory {
        let meta = upstare_instrument::abi::MemoryMeta { min: pages, max: Some(64), ..Default::default() };
        ProgramMemory::new(&crate::new_engine().unwrap(), &meta).unwrap()
    }

    #[test]
    fn a_released_area_is_reused_and_memory_grows_only_when_nothing_fits() {
        let memory = memory(2);
        let mut fresh = FreshAreas::default();
        let first = fresh.reserve(&memory, 100, 0).unwrap();
        assert_eq!(first, Area { base: 2 * PAGE as u32, len: PAGE as u32 });
        fresh.release(first);
        assert_eq!(fresh.reserve(&memory, PAGE as u32, 0).unwrap(), first, "the same area again");
        assert_eq!(memory.size(), 3 * PAGE);
        // Two pages do not fit in the one in use: new pages.
        let second = fresh.reserve(&memory, PAGE as u32 + 1, 0).unwrap();
        assert_eq!(second, Area { base: 3 * PAGE as u32, len: 2 * PAGE as u32 });
        fresh.free(&[first, second]);
        // Freed neighbours merged: one page is split off their three.
        let third = fresh.reserve(&memory, 1, 0).unwrap();
        assert_eq!(third, first);
        assert_eq!(fresh.figures(), FreshFigures { used: PAGE, free: 2 * PAGE });
        assert_eq!(memory.size(), 5 * PAGE, "nothing grew after the first two");
    }

    /// With other processes whose memories reach `floor`, an area is new
    /// pages at or above it, even when a free one would fit.
    #[test]
    fn an_area_for_several_processes_lies_above_every_memory() {
        let memory = memory(2);
        let mut fresh = FreshAreas::default();
        let first = fresh.reserve(&memory, 100, 0).unwrap();
        fresh.release(first);
        let above = fresh.reserve(&memory, 100, 5 * PAGE + 1).unwrap();
        assert_eq!(above, Area { base: 6 * PAGE as u32, len: PAGE as u32 });
        assert_eq!(memory.size(), 7 * PAGE);
        let next = fresh.reserve(&memory, 100, 2 * PAGE).unwrap();
        assert_eq!(next, Area { base: 7 * PAGE as u32, len: PAGE as u32 }, "the free area below is not reused");
    }

    #[test]
    fn adjacent_free_areas_merge_and_in_use_ones_do_not() {
        let mut a = areas(&[(10, 1, false), (11, 2, false), (13, 1, false), (20, 1, false)]);
        let all: Vec<Area> = a.areas.iter().map(|(x, _)| *x).collect();
        a.free(&[all[0], all[1], all[3]]);
        assert_eq!(a.areas.len(), 3, "{a:?}");
        assert_eq!(a.areas[0], (Area { base: 10 * PAGE as u32, len: 3 * PAGE as u32 }, true));
        assert_eq!(a.figures(), FreshFigures { used: PAGE, free: 4 * PAGE });
    }
}
