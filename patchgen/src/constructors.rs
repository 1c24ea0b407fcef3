//! Which constructors run at an update.
//!
//! A program's constructors (`__attribute__((constructor))`, and those of
//! the libc objects it links, such as wasi-libc's preopen table) run once,
//! when it starts: wasm-ld's `__wasm_call_ctors` calls them in order. An
//! update does not start the program again. The constructors the running
//! version already had do not run again: what they set up is state that
//! exists and is carried over. The constructors only the new version has
//! set up state that is new (a libc object the new version links in for the
//! first time, say), so they run once at the update, in their order, after
//! the new version's data is in place and before any C transformer and
//! before the new code resumes. Constructors are matched by function name.

use crate::version::Version;

/// Prefix of the export through which the host calls an added constructor
/// of the relinked module: `upstare_constructor_<n>`, numbered in order.
pub const EXPORT_PREFIX: &str = "upstare_constructor_";

/// The function wasm-ld generates to call every constructor.
const CALL_CTORS: &str = "__wasm_call_ctors";

/// The new version's constructors the old version does not have, as
/// function indices of the new module, in the order they run.
pub fn added(old: &Version, new: &Version) -> Vec<u32> {
    let before: Vec<_> = called_at_start(old)
        .into_iter()
        .map(|f| &old.function_keys[f as usize])
        .collect();
    called_at_start(new)
        .into_iter()
        .filter(|&f| !before.contains(&&new.function_keys[f as usize]))
        .collect()
}

/// The functions `__wasm_call_ctors` calls, in order. It is synthesised by
/// the linker, so it has no relocations: its calls are read from its code.
fn called_at_start(version: &Version) -> Vec<u32> {
    let info = &version.info;
    let Some(body) = info
        .functions
        .iter()
        .find(|f| f.name.as_deref() == Some(CALL_CTORS))
        .and_then(|f| f.body.clone())
    else {
        return Vec::new();
    };
    let start = (info.code_section + body.start) as usize;
    let Some(bytes) = version
        .wasm
        .get(start..(info.code_section + body.end) as usize)
    else {
        return Vec::new();
    };
    let body = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(bytes, start));
    let Ok(operators) = body.get_operators_reader() else {
        return Vec::new();
    };
    operators
        .into_iter()
        .map_while(Result::ok)
        .filter_map(|op| match op {
            wasmparser::Operator::Call { function_index } => Some(function_index),
            _ => None,
        })
        .collect()
}
