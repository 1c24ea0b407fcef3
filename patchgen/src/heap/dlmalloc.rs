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

use super::{MemoryView, read_u32};
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
    /// For each page (of `1 << page_shift` bytes) from `first_page` on,
    /// the index of the first allocation that ends after the page's start:
    /// a lookup searches only the allocations of one page.
    pages: Vec<u32>,
    first_page: u32,
    /// Pages are as small as keeps them at most two per allocation, so a
    /// dense heap's page holds a few allocations (one cache line of
    /// starts) and a sparse one's index stays small.
    page_shift: u32,
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

    /// The address allocation `i` starts at (as `all()[i].start`, from
    /// the denser array lookups search).
    pub fn start(&self, i: usize) -> u32 {
        self.starts[i]
    }

    /// The allocation whose bytes contain `address`.
    pub fn containing(&self, address: u32) -> Option<usize> {
        let page = (address >> self.page_shift).checked_sub(self.first_page)? as usize;
        let from = *self.pages.get(page)? as usize;
        let to = self.pages.get(page + 1).map_or(self.chunks.len(), |&t| (t as usize + 1).min(self.chunks.len()));
        let after = from + self.starts[from..to].partition_point(|&start| start <= address);
        let i = after.checked_sub(1)?;
        // Most pointers hold what `malloc` returned: no need to read the
        // size (another cache miss) to know they are inside.
        (address == self.starts[i] || address - self.starts[i] < self.chunks[i].size).then_some(i)
    }

    /// Fills [`Chunks::pages`] once the allocations are sorted.
    fn index_pages(&mut self) {
        self.starts = self.chunks.iter().map(|c| c.start).collect();
        let (Some(first), Some(last)) = (self.chunks.first(), self.chunks.last()) else { return };
        let end = u64::from(last.start) + u64::from(last.size);
        let span = end - u64::from(first.start);
        let per_page = (span / (2 * self.chunks.len() as u64)).max(1);
        self.page_shift = (u64::BITS - per_page.leading_zeros()).max(MIN_PAGE_SHIFT);
        self.first_page = first.start >> self.page_shift;
        let end_page = (end >> self.page_shift) as u32;
        let mut i = 0;
        self.pages = (self.first_page..=end_page)
            .map(|page| {
                let page_start = u64::from(page) << self.page_shift;
                while i < self.chunks.len() && u64::from(self.chunks[i].start) + u64::from(self.chunks[i].size) <= page_start {
                    i += 1;
                }
                i as u32
            })
            .collect();
    }
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
        read_u32(memory, at).ok_or_else(|| Error::Corrupt(format!("{at:#x} is out of bounds")))
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
