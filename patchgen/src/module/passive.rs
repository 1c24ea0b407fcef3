//! Where passive data segments go. A module linked with a shared memory (a
//! wasi-threads program) has no active segments: its start function,
//! `__wasm_init_memory`, copies each segment to its address with
//! `memory.init` and zero-fills `.bss` with `memory.fill`, once for the
//! whole program. Those constant operands are the segments' addresses, as
//! an active segment's offset would be. (The TLS segment is copied there
//! too, as the main thread's thread-local block; other threads copy it to
//! blocks of their own.)

use std::ops::Range;

use wasmparser::{FunctionBody, Operator};

use super::Error;

/// The constant copies and fills of a start function.
#[derive(Debug, Default)]
pub(super) struct Placements {
    /// `memory.init` of a segment at a constant address: (segment, address).
    inits: Vec<(u32, u32)>,
    /// `memory.fill` with zero of a constant range: (address, length).
    fills: Vec<(u32, u32)>,
}

impl Placements {
    /// Reads the copies and fills whose operands are all constants, the
    /// shape wasm-ld gives `__wasm_init_memory`.
    pub(super) fn read(body: &FunctionBody<'_>) -> Result<Self, Error> {
        let mut out = Placements::default();
        // The operand stack, as far as constants make it: anything else
        // forgets it, which only ever loses a placement.
        let mut stack: Vec<i32> = Vec::new();
        let take3 = |stack: &mut Vec<i32>| {
            let top = stack.len().checked_sub(3).map(|at| (stack[at] as u32, stack[at + 1], stack[at + 2] as u32));
            stack.clear();
            top
        };
        for op in body.get_operators_reader()? {
            match op? {
                Operator::I32Const { value } => stack.push(value),
                Operator::GlobalSet { .. } | Operator::Drop => {
                    stack.pop();
                }
                Operator::MemoryInit { data_index, mem: 0 } => {
                    if let Some((dest, 0, _)) = take3(&mut stack) {
                        out.inits.push((data_index, dest));
                    }
                }
                Operator::MemoryFill { mem: 0 } => {
                    if let Some((dest, 0, len)) = take3(&mut stack) {
                        out.fills.push((dest, len));
                    }
                }
                _ => stack.clear(),
            }
        }
        Ok(out)
    }

    /// Gives each data segment without an address the one its start
    /// function copies it to; a segment of zeros that nothing copies takes
    /// the zero fill of its length (`.bss`).
    pub(super) fn place(&self, segments: &mut [(Option<u32>, Vec<u8>, Range<u32>)]) {
        let mut fills = self.fills.clone();
        for (index, (address, bytes, _)) in segments.iter_mut().enumerate() {
            if address.is_some() {
                continue;
            }
            if let Some((_, dest)) = self.inits.iter().find(|(s, _)| *s as usize == index) {
                *address = Some(*dest);
            } else if bytes.iter().all(|b| *b == 0) {
                if let Some(i) = fills.iter().position(|(_, len)| *len as usize == bytes.len()) {
                    *address = Some(fills.remove(i).0);
                }
            }
        }
    }
}
