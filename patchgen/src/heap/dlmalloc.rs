//! The live allocations of wasi-libc's allocator (dlmalloc), read from its
//! state in a paused program's memory.
//!
//! dlmalloc keeps one `struct malloc_state`, the static `_gm_`, whose `seg`
//! member heads a list of memory segments; inside a segment, chunks lie side
//! by side, each starting with two words (`prev_foot`, `head`), the low bits
//! of `head` saying whether the chunk is in use. The walk starts at each
//! segment's first aligned chunk and stops at the top chunk (the free space
//! at the end of the heap) or at the fence post that closes a segment. The
//! member offsets come from DWARF (wasi-libc is built with `-g`), the flag
//! bits and alignment from dlmalloc's 32-bit configuration in wasi-libc.

use super::MemoryView;
use crate::dwarf::{DebugInfo, Type, TypeId};
use crate::version::Version;

/// `CINUSE_BIT`: this chunk is in use.
const IN_USE: u32 = 2;
/// The flag bits of `head`; the rest is the chunk's size.
const FLAGS: u32 = 7;
/// `FENCEPOST_HEAD` (`INUSE_BITS | SIZE_T_SIZE`): closes a segment.
const FENCEPOST: u32 = 7;
/// `MALLOC_ALIGNMENT` in wasi-libc.
pub(crate) const ALIGN: u32 = 16;
/// From a chunk to the memory it hands out (`chunk2mem`).
const HEADER: u32 = 8;
/// What an in-use chunk spends on its own bookkeeping (`CHUNK_OVERHEAD`):
/// the next chunk's `prev_foot` belongs to this chunk's payload.
const OVERHEAD: u32 = 4;
/// More segments than this means the list is corrupt (it loops).
const MAX_SEGMENTS: usize = 1 << 16;
/// The finest granule of the index [`Chunks::containing`] searches by:
/// one allocation's alignment.
const MIN_PAGE_SHIFT: u32 = 4;
/// The index's coarse level: 64 KiB regions (a wasm page), each split into
/// pages of its own size.
const REGION_SHIFT: u32 = 16;

/// One allocation in use: the address `malloc` returned and how many bytes
/// from there belong to it (at least what was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The address the program holds.
    pub start: u32,
    /// Usable bytes from `start`.
    pub size: u32,
}

/// Every allocation in use, by address, and where the allocator keeps its
/// own state.
#[derive(Debug, Clone, Default)]
pub struct Chunks {
    chunks: Vec<Chunk>,
    /// The chunks' starts alone, which [`Chunks::containing`] searches: half
    /// the cache lines of searching the chunks.
    starts: Vec<u32>,
    /// The memory segments, as (base, size).
    segments: Vec<(u32, u32)>,
    /// For each 64 KiB region from `first_region` on, where its pages
    /// start in `pages` and their size. Each region has about two pages
    /// per allocation it overlaps, so a page of small objects holds one or
    /// two of them however sparse the rest of the heap is (a heap of a
    /// million small objects beside a 1 GiB buffer had 43 per page when
    /// one page size served the whole heap), and a region inside one large
    /// allocation costs one entry.
    regions: Vec<RegionPages>,
    first_region: u32,
    /// For each page, the index of the first allocation that ends after
    /// the page's start, and one more entry (the allocation count) after
    /// the last: a lookup searches only the allocations of one page.
    pages: Vec<u32>,
    /// Chunks the allocator keeps for itself (the record of each segment
    /// after the first lives in an allocation marked in use), by index.
    internal: Vec<usize>,
    /// What else `malloc` writes, as (address, size): `_gm_`, dlmalloc's
    /// parameters (`mparams`, set on first use) and `errno` (set when it
    /// fails).
    state: Vec<(u32, u32)>,
}

impl Chunks {
    /// The allocations, in address order.
    pub fn all(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Everything `malloc` and `free` may write, as (address, size): the
    /// allocator's state, and every byte of its segments that is not the
    /// payload of an allocation in use (chunk headers, free chunks, the top
    /// chunk). Payloads in use are the program's; the allocator never
    /// writes them, so they need no copy for an exact undo.
    pub fn allocator_bytes(&self) -> Vec<(u32, u32)> {
        let mut out = self.state.clone();
        out.extend(self.internal.iter().map(|&i| (self.chunks[i].start, self.chunks[i].size)));
        for &(base, size) in &self.segments {
            let end = base.saturating_add(size);
            let mut at = base;
            let first = self.chunks.partition_point(|c| c.start < base);
            for c in self.chunks[first..].iter().take_while(|c| c.start < end) {
                if c.start > at {
                    out.push((at, c.start - at));
                }
                at = at.max(c.start.saturating_add(c.size));
            }
            if end > at {
                out.push((at, end - at));
            }
        }
        out
    }

    /// The allocator's memory segments (one, until the heap had to grow
    /// past memory something else took).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Whether allocation `i` is the allocator's own, not the program's.
    pub fn is_internal(&self, i: usize) -> bool {
        self.internal.contains(&i)
    }

    /// The allocation whose bytes contain `address`.
    pub fn containing(&self, address: u32) -> Option<usize> {
        let region = self.regions.get((address >> REGION_SHIFT).checked_sub(self.first_region)? as usize)?;
        let page = region.first as usize + ((address & ((1 << REGION_SHIFT) - 1)) >> region.shift) as usize;
        let from = self.pages[page] as usize;
        let to = (self.pages[page + 1] as usize + 1).min(self.chunks.len());
        let after = from + self.starts[from..to].partition_point(|&start| start <= address);
        let i = after.checked_sub(1)?;
        // Most pointers hold what `malloc` returned: no need to read the
        // size (another cache miss) to know they are inside.
        (address == self.starts[i] || address - self.starts[i] < self.chunks[i].size).then_some(i)
    }

    /// Fills [`Chunks::regions`] and [`Chunks::pages`] once the
    /// allocations are sorted.
    fn index_pages(&mut self) {
        self.starts = self.chunks.iter().map(|c| c.start).collect();
        let (Some(first), Some(last)) = (self.chunks.first(), self.chunks.last()) else { return };
        let end = u64::from(last.start) + u64::from(last.size);
        self.first_region = first.start >> REGION_SHIFT;
        let regions = ((end.saturating_sub(1) >> REGION_SHIFT) - u64::from(self.first_region) + 1) as usize;
        let mut overlaps = vec![0u32; regions];
        for c in &self.chunks {
            let from = (c.start >> REGION_SHIFT) - self.first_region;
            let to = ((u64::from(c.start) + u64::from(c.size.max(1)) - 1) >> REGION_SHIFT) as u32 - self.first_region;
            for n in &mut overlaps[from as usize..=to as usize] {
                *n += 1;
            }
        }
        let mut i = 0;
        self.regions = Vec::with_capacity(regions);
        self.pages.clear();
        for (r, &n) in overlaps.iter().enumerate() {
            // About two pages per allocation: `2n` rounded up to a power of two.
            let pages_log2 = (2 * n.max(1)).next_power_of_two().trailing_zeros();
            let shift = REGION_SHIFT.saturating_sub(pages_log2).max(MIN_PAGE_SHIFT);
            self.regions.push(RegionPages { first: self.pages.len() as u32, shift });
            let base = u64::from(self.first_region + r as u32) << REGION_SHIFT;
            for page in 0..1u64 << (REGION_SHIFT - shift) {
                let page_start = base + (page << shift);
                while i < self.chunks.len() && u64::from(self.chunks[i].start) + u64::from(self.chunks[i].size) <= page_start {
                    i += 1;
                }
                self.pages.push(i as u32);
            }
        }
        self.pages.push(self.chunks.len() as u32);
    }
}

/// One 64 KiB region of [`Chunks`]' index: its pages are `pages[first..]`,
/// `1 << shift` bytes each.
#[derive(Debug, Clone, Copy, Default)]
struct RegionPages {
    first: u32,
    shift: u32,
}

/// Why the allocator's state could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `_gm_` has no DWARF, or not the members this reader needs.
    #[error("the allocator's state `_gm_` has no usable debug info ({0})")]
    NoLayout(&'static str),
    /// A read fell outside memory, or the chunks do not add up.
    #[error("the allocator's state is corrupt: {0}")]
    Corrupt(String),
}

/// Where `_gm_`'s members are.
struct Layout {
    address: u32,
    size: u32,
    top: u64,
    seg: u64,
    seg_base: u64,
    seg_size: u64,
    seg_next: u64,
}

/// Walks the chunks of the allocator of `version`, running with `memory`.
/// `Ok(None)` when the program has no dlmalloc (no `_gm_` in its DWARF).
pub fn walk(version: &Version, memory: &dyn MemoryView) -> Result<Option<Chunks>, Error> {
    let Some(layout) = layout(version)? else { return Ok(None) };
    let word = |at: u64| -> Result<u32, Error> {
        let at = u32::try_from(at).map_err(|_| Error::Corrupt(format!("address {at:#x}")))?;
        memory.read_u32(at).ok_or_else(|| Error::Corrupt(format!("{at:#x} is out of bounds")))
    };
    let base = u64::from(layout.address);
    let top = word(base + layout.top)?;
    let mut chunks = Vec::new();
    let mut segments = Vec::new();
    let mut records = Vec::new();
    let mut segment = base + layout.seg;
    for _ in 0..MAX_SEGMENTS {
        let (start, size) = (word(segment + layout.seg_base)?, word(segment + layout.seg_size)?);
        if start != 0 {
            walk_segment(start, size, top, &word, &mut chunks)?;
            segments.push((start, size));
        }
        segment = u64::from(word(segment + layout.seg_next)?);
        if segment != 0 {
            records.push(segment as u32);
        }
        if segment == 0 {
            chunks.sort_by_key(|c| c.start);
            segments.sort_unstable();
            let mut found = Chunks { chunks, ..Chunks::default() };
            found.index_pages();
            let internal = records.iter().filter_map(|&r| found.containing(r)).collect();
            let mut state = vec![(layout.address, layout.size)];
            state.extend(["mparams", "errno"].iter().filter_map(|name| global_bytes(version, name)));
            found.segments = segments;
            found.internal = internal;
            found.state = state;
            return Ok(Some(found));
        }
    }
    Err(Error::Corrupt("its list of segments does not end".into()))
}

fn walk_segment(
    start: u32,
    size: u32,
    top: u32,
    word: &dyn Fn(u64) -> Result<u32, Error>,
    out: &mut Vec<Chunk>,
) -> Result<(), Error> {
    let end = u64::from(start) + u64::from(size);
    // `align_as_chunk`: the first chunk whose memory is aligned.
    let mut chunk = u64::from(start) + u64::from((ALIGN - (start + HEADER) % ALIGN) % ALIGN);
    while chunk < end && chunk != u64::from(top) {
        let head = word(chunk + 4)?;
        if head == FENCEPOST {
            break;
        }
        let size = head & !FLAGS;
        if size < ALIGN || chunk + u64::from(size) > end {
            return Err(Error::Corrupt(format!("the chunk at {chunk:#x} has size {size}")));
        }
        if head & IN_USE != 0 {
            out.push(Chunk { start: (chunk + u64::from(HEADER)) as u32, size: size - OVERHEAD });
        }
        chunk += u64::from(size);
    }
    Ok(())
}

fn layout(version: &Version) -> Result<Option<Layout>, Error> {
    let debug = &version.debug;
    let Some(gm) = debug.globals().iter().find(|g| g.name == super::ALLOCATOR_STATE) else { return Ok(None) };
    let address = running_address(version, gm.address, super::ALLOCATOR_STATE).ok_or(Error::NoLayout("no symbol"))?;
    let top = member(debug, gm.ty, "top").ok_or(Error::NoLayout("no member `top`"))?;
    let (seg, seg_ty) = member_typed(debug, gm.ty, "seg").ok_or(Error::NoLayout("no member `seg`"))?;
    let field = |name| member(debug, seg_ty, name).ok_or(Error::NoLayout("no segment members"));
    let size = debug.size_of(gm.ty).and_then(|s| u32::try_from(s).ok()).ok_or(Error::NoLayout("no size"))?;
    Ok(Some(Layout {
        address,
        size,
        top,
        seg,
        seg_base: field("base")?,
        seg_size: field("size")?,
        seg_next: field("next")?,
    }))
}

fn member(debug: &DebugInfo, ty: TypeId, name: &str) -> Option<u64> {
    member_typed(debug, ty, name).map(|(offset, _)| offset)
}

fn member_typed(debug: &DebugInfo, ty: TypeId, name: &str) -> Option<(u64, TypeId)> {
    match debug.ty(ty) {
        Type::Struct { members, .. } => {
            members.iter().find(|m| m.name.as_deref() == Some(name)).map(|m| (m.offset, m.ty))
        }
        _ => None,
    }
}

/// The running address and size of the data symbol `name` (by the
/// symbol table: wasi-libc's `errno` has no DWARF address).
fn global_bytes(version: &Version, name: &str) -> Option<(u32, u32)> {
    let (i, def) = version.info.symbols.iter().enumerate().find_map(|(i, s)| {
        let d = s.data()?;
        (!s.is_absolute() && s.name.as_deref() == Some(name)).then_some((i, d))
    })?;
    let address = version.layout.data.get(&(i as u32)).copied().unwrap_or(def.address);
    Some((address, def.size))
}

/// The running address of the data symbol `name` that its module placed at
/// `own` (its own layout, as DWARF says).
pub(crate) fn running_address(version: &Version, own: u32, name: &str) -> Option<u32> {
    let (i, def) = version.info.symbols.iter().enumerate().find_map(|(i, s)| {
        let d = s.data()?;
        (!s.is_absolute() && d.address == own && s.name.as_deref() == Some(name)).then_some((i, d))
    })?;
    Some(version.layout.data.get(&(i as u32)).copied().unwrap_or(def.address))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocations `layout` lists as (gap before it, size), from 0x1_0000.
    fn chunks(layout: &[(u32, u32)]) -> Chunks {
        let mut at = 0x1_0000;
        let chunks = layout
            .iter()
            .map(|&(gap, size)| {
                let c = Chunk { start: at + gap, size };
                at = c.start + size;
                c
            })
            .collect();
        let mut found = Chunks { chunks, ..Chunks::default() };
        found.index_pages();
        found
    }

    fn by_scan(chunks: &Chunks, address: u32) -> Option<usize> {
        chunks.all().iter().position(|c| address >= c.start && address - c.start < c.size)
    }

    #[test]
    fn every_address_finds_the_allocation_holding_it() {
        // Dense small objects beside a buffer of 3 MiB, which gives
        // neighbouring regions very different page sizes, gaps of free
        // memory, and an allocation straddling regions.
        let mut layout = vec![(0, 24); 3000];
        layout.push((8, 3 << 20));
        layout.extend([(0, 40); 500]);
        layout.push((200_000, 100_000));
        layout.extend((0..2000).map(|i| (16 * (i % 3), 8 + 16 * (i % 5))));
        let chunks = chunks(&layout);
        let (low, high) = (0x1_0000 - 100, chunks.all().last().map_or(0, |c| c.start + c.size) + 100);
        for address in (low..high).step_by(4).chain([low, high, 0, u32::MAX]) {
            assert_eq!(chunks.containing(address), by_scan(&chunks, address), "address {address:#x}");
        }
    }

    #[test]
    fn an_empty_heap_holds_nothing() {
        assert_eq!(chunks(&[]).containing(0x1_0000), None);
    }
}
