//! The order of the output's defined functions: the appended helpers move
//! ahead of the program's functions, which each move up by their number.
//!
//! Why: wasmtime compiles a module's functions in parallel, handing rayon
//! its inputs in function index order, so a thread works through a run of
//! neighbouring functions and the wall time depends on where the largest
//! ones sit. Appended at the end, the helpers lengthen the list behind the
//! program's functions and push a large one (`printf_core` in a small
//! guest) from the first half, which one thread starts on at once, into
//! the second, which the other thread reaches late. With the helpers last
//! the small guests compiled in 1.57x to 2.12x the original's wall time,
//! with them first in 1.27x to 1.50x, for the same compile instructions
//! (`docs/PERFORMANCE.md`).
//!
//! This is a module-to-module pass over the assembled output. It renumbers
//! every reference to a defined function (calls, `ref.func`, elements,
//! exports, the name section) and copies everything else as it is: a body
//! changes only where a call's index does, so the offset map keeps its
//! runs, split where a renumbered call's encoding changes length. The
//! metadata names functions by their index in the original module, so it
//! does not change; it and the offset map, which counts output indices,
//! are appended to the module after this pass.

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{Encode, Instruction, NameMap, NameSection};
use wasmparser::{FunctionBody, KnownCustom, Name, Operator};

use crate::abi::offsets::OffsetMap;
use crate::error::{internal, Result};

/// Moves the `helpers` defined functions that follow the program's own
/// `program` ones (after `imported` function imports) ahead of them;
/// `offsets` lists the runs of every program function, by its index before
/// the move, and comes back with the indices after it.
pub(crate) fn helpers_first(
    wasm: &[u8],
    offsets: OffsetMap,
    imported: u32,
    program: u32,
    helpers: u32,
) -> Result<(Vec<u8>, OffsetMap)> {
    let defined = program + helpers;
    // Old defined position of each output position.
    let order: Vec<u32> = (program..defined).chain(0..program).collect();
    let mut new_position = vec![0; defined as usize];
    for (new, &old) in order.iter().enumerate() {
        new_position[old as usize] = new as u32;
    }
    let mut r = Reorder { wasm, imported, new_position, order, offsets, moved: OffsetMap::default() };
    let mut module = wasm_encoder::Module::new();
    r.parse_core_module(&mut module, wasmparser::Parser::new(0), wasm)
        .map_err(|e| internal(format!("cannot reorder the output's functions: {e}")))?;
    let mut moved = r.moved;
    moved.functions.sort_by_key(|(f, _)| *f);
    Ok((module.finish(), moved))
}

struct Reorder<'a> {
    wasm: &'a [u8],
    imported: u32,
    /// By old defined position, the new one.
    new_position: Vec<u32>,
    /// By new defined position, the old one.
    order: Vec<u32>,
    /// Runs by old function index.
    offsets: OffsetMap,
    /// Runs by new function index.
    moved: OffsetMap,
}

type ReError = reencode::Error<std::convert::Infallible>;

impl Reorder<'_> {
    fn new_index(&self, func: u32) -> u32 {
        // Nothing validates the name section: an index it gives past the
        // functions stays as it is.
        match func.checked_sub(self.imported).and_then(|d| self.new_position.get(d as usize)) {
            Some(&new) => self.imported + new,
            None => func,
        }
    }

    /// `body` with its references to defined functions renumbered, and
    /// where the difference in length between the old and the new body
    /// changes: (old offset from the body's start, new minus old length of
    /// everything before it).
    fn renumber(&self, body: &FunctionBody<'_>) -> std::result::Result<(Vec<u8>, Vec<(u32, i64)>), ReError> {
        let range = body.range();
        let mut out = Vec::with_capacity(range.len());
        let mut shifts = Vec::new();
        let mut copied = range.start;
        let mut ops = body.get_operators_reader()?;
        while !ops.eof() {
            let (op, at) = ops.read_with_offset()?;
            let renumbered = match op {
                Operator::Call { function_index } if function_index >= self.imported => {
                    Instruction::Call(self.new_index(function_index))
                }
                Operator::ReturnCall { function_index } if function_index >= self.imported => {
                    Instruction::ReturnCall(self.new_index(function_index))
                }
                Operator::RefFunc { function_index } if function_index >= self.imported => {
                    Instruction::RefFunc(self.new_index(function_index))
                }
                _ => continue,
            };
            let end = ops.original_position();
            out.extend_from_slice(&self.wasm[copied..at]);
            renumbered.encode(&mut out);
            copied = end;
            let shift = out.len() as i64 - (end - range.start) as i64;
            if shift != shifts.last().map_or(0, |&(_, s)| s) {
                shifts.push(((end - range.start) as u32, shift));
            }
        }
        out.extend_from_slice(&self.wasm[copied..range.end]);
        Ok((out, shifts))
    }
}

/// The runs of a body whose length changed by `shifts` (as
/// [`Reorder::renumber`] reports them): every old byte still maps to the
/// original offset it did, a run starting wherever the shift changes.
fn moved_runs(runs: &[(u32, u32)], shifts: &[(u32, i64)]) -> Vec<(u32, u32)> {
    let Some(&(first, _)) = runs.first() else { return Vec::new() };
    let mut starts: Vec<u32> = runs.iter().map(|&(o, _)| o).collect();
    starts.extend(shifts.iter().map(|&(at, _)| at).filter(|&at| at > first));
    starts.sort_unstable();
    starts.dedup();
    starts
        .into_iter()
        .map(|at| {
            let (o, orig) = runs[runs.partition_point(|&(o, _)| o <= at) - 1];
            let k = shifts.partition_point(|&(s, _)| s <= at);
            let shift = k.checked_sub(1).map_or(0, |k| shifts[k].1);
            ((at as i64 + shift) as u32, orig + (at - o))
        })
        .collect()
}

impl Reencode for Reorder<'_> {
    type Error = std::convert::Infallible;

    fn function_index(&mut self, func: u32) -> std::result::Result<u32, ReError> {
        Ok(self.new_index(func))
    }

    fn parse_function_section(
        &mut self,
        functions: &mut wasm_encoder::FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> std::result::Result<(), ReError> {
        let types = section.into_iter().collect::<std::result::Result<Vec<u32>, _>>()?;
        for &old in &self.order {
            functions.function(types[old as usize]);
        }
        Ok(())
    }

    fn parse_code_section(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> std::result::Result<(), ReError> {
        let bodies = section.into_iter().collect::<std::result::Result<Vec<_>, _>>()?;
        let mut renumbered = Vec::with_capacity(bodies.len());
        for (old, body) in bodies.iter().enumerate() {
            let (bytes, shifts) = self.renumber(body)?;
            let func = self.imported + old as u32;
            if let Ok(i) = self.offsets.functions.binary_search_by_key(&func, |(f, _)| *f) {
                let runs = moved_runs(&self.offsets.functions[i].1, &shifts);
                self.moved.functions.push((self.new_index(func), runs));
            }
            renumbered.push(bytes);
        }
        for &old in &self.order {
            code.raw(&renumbered[old as usize]);
        }
        Ok(())
    }

    /// The name section renumbered, its maps kept in increasing index order
    /// as the format wants; a name section that does not read is left out
    /// (names serve diagnostics only, and wasmtime ignores one that does
    /// not read).
    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> std::result::Result<(), ReError> {
        let KnownCustom::Name(reader) = section.as_known() else {
            module.section(&self.custom_section(section)?);
            return Ok(());
        };
        let mut names = NameSection::new();
        for subsection in reader {
            let Ok(subsection) = subsection else { return Ok(()) };
            let renumbered = match subsection {
                Name::Function(map) => self.sorted(map).map(|m| names.functions(&m)),
                Name::Local(map) => self.sorted_indirect(map).map(|m| names.locals(&m)),
                Name::Label(map) => self.sorted_indirect(map).map(|m| names.labels(&m)),
                other => self.parse_custom_name_subsection(&mut names, other),
            };
            if renumbered.is_err() {
                return Ok(());
            }
        }
        module.section(&names);
        Ok(())
    }
}

impl Reorder<'_> {
    fn sorted(&self, map: wasmparser::NameMap<'_>) -> std::result::Result<NameMap, ReError> {
        let mut entries = Vec::new();
        for naming in map {
            let naming = naming?;
            entries.push((self.new_index(naming.index), naming.name));
        }
        entries.sort_by_key(|&(i, _)| i);
        let mut out = NameMap::new();
        for (i, name) in entries {
            out.append(i, name);
        }
        Ok(out)
    }

    fn sorted_indirect(&self, map: wasmparser::IndirectNameMap<'_>) -> std::result::Result<wasm_encoder::IndirectNameMap, ReError> {
        let mut entries = Vec::new();
        for naming in map {
            let naming = naming?;
            let mut inner = NameMap::new();
            for n in naming.names {
                let n = n?;
                inner.append(n.index, n.name);
            }
            entries.push((self.new_index(naming.index), inner));
        }
        entries.sort_by_key(|(i, _)| *i);
        let mut out = wasm_encoder::IndirectNameMap::new();
        for (i, names) in &entries {
            out.append(*i, names);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::moved_runs;

    #[test]
    fn runs_split_where_a_renumbered_call_grows_and_keep_every_old_byte_on_its_original() {
        // Two runs; a call ending at 10 grew by one byte, one ending at 30
        // by another.
        let runs = [(2, 100), (20, 500)];
        let shifts = [(10, 1), (30, 2)];
        let moved = moved_runs(&runs, &shifts);
        assert_eq!(moved, vec![(2, 100), (11, 108), (21, 500), (32, 510)]);
        let original = |runs: &[(u32, u32)], at: u32| {
            let (o, orig) = runs[runs.partition_point(|&(o, _)| o <= at) - 1];
            orig + (at - o)
        };
        let new_offset = |at: u32| at as i64 + shifts.iter().rev().find(|&&(s, _)| s <= at).map_or(0, |&(_, d)| d);
        for at in 2..40 {
            assert_eq!(original(&moved, new_offset(at) as u32), original(&runs, at), "old byte {at}");
        }
    }
}
