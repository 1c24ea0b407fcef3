//! What the user sees when a guest traps: the trap and a wasm backtrace
//! with function names (from the module's name section) and, where the
//! module carries DWARF, source lines.

use std::fmt;

use wasmtime::{Trap, WasmBacktrace};

use crate::sourcemap::SourceMap;

/// One frame of a guest backtrace, innermost first.
#[derive(Debug, Clone)]
pub struct TrapFrame {
    /// The function's index in the module.
    pub func_index: u32,
    /// Its name, when the module has a name section.
    pub name: Option<String>,
    /// Byte offset of the instruction in the module, when known.
    pub offset: Option<usize>,
    /// `file:line` from DWARF, when known.
    pub location: Option<String>,
}

/// A trap and where it happened.
#[derive(Debug, Clone)]
pub struct TrapReport {
    /// The trap, e.g. "wasm `unreachable` instruction executed".
    pub message: String,
    /// The guest's call stack at the trap.
    pub frames: Vec<TrapFrame>,
}

impl TrapReport {
    /// Extracts the trap and backtrace wasmtime attached to `err`; for an
    /// instrumented module, `source_map` supplies the source lines.
    pub fn from_error(err: &wasmtime::Error, source_map: Option<&SourceMap>) -> Self {
        let message = match err.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => err.to_string(),
        };
        let locator = source_map.and_then(SourceMap::locator);
        let frames = err
            .downcast_ref::<WasmBacktrace>()
            .map(|bt| {
                bt.frames()
                    .iter()
                    .map(|f| {
                        let symbol = f.symbols().first();
                        let location = symbol
                            .and_then(|s| match (s.file(), s.line()) {
                                (Some(file), Some(line)) => Some(format!("{file}:{line}")),
                                _ => None,
                            })
                            .or_else(|| locator.as_ref()?.location(f.func_index(), f.module_offset()?));
                        TrapFrame {
                            func_index: f.func_index(),
                            name: f.func_name().map(str::to_string),
                            offset: f.module_offset(),
                            location,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        TrapReport { message, frames }
    }
}

impl fmt::Display for TrapReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "guest trapped: {}", self.message)?;
        write!(f, "wasm backtrace:")?;
        for (i, frame) in self.frames.iter().enumerate() {
            let name = frame.name.clone().unwrap_or_else(|| format!("<func {}>", frame.func_index));
            match frame.offset {
                Some(off) => write!(f, "\n  {i:>3}: {off:#8x} - {name}")?,
                None => write!(f, "\n  {i:>3}: {:>8} - {name}", "")?,
            }
            if let Some(loc) = &frame.location {
                write!(f, "\n                     at {loc}")?;
            }
        }
        Ok(())
    }
}
