//! `upstare-patchgen` compares the running version of a C program (compiled
//! to wasm32-wasi by `bin/upstare-cc`) with its next version and plans the
//! update: which functions changed, where every piece of state goes, how
//! the frames of active functions move, and whether it is safe at all.
//!
//! It reads only what the toolchain leaves in the modules: the `linking`
//! symbol table and relocations (from `-Wl,--emit-relocs`) and DWARF (from
//! `-g`). Nothing here knows wasmtime: the host applies the plan.
//!
//! The pipeline, one module per phase:
//!
//! 1. [`module`] reads a module's symbols, segments, table and relocations;
//!    [`dwarf`] its variables, types and scopes; [`version`] pairs them with
//!    the running [`version::Layout`] and keys symbols by name.
//! 2. [`diff`] matches functions by name and compares bodies through
//!    [`body`] fingerprints, which ignore where things moved.
//! 3. [`plan`] decides each data object's fate (kept in place, added in
//!    fresh memory, converted field by field), the table slots and the wasm
//!    globals to carry, which constructors run ([`constructors`]), and
//!    collects refusals, among them whatever the relink of step 4 cannot
//!    do (the plan tries it), so its verdict is the update's.
//! 4. [`plan::Plan::link`] places fresh memory at the address the host
//!    chose and [`relink`]s the new module against the running layout.
//! 5. [`frames`] moves each saved frame to the new code, using
//!    [`liveness`] and DWARF for functions that changed; [`retreat`] sends
//!    a frame back to its loop header, [`rebuild`] rebuilds one whose area
//!    in linear memory changed where it stands.
//! 6. [`paused`] answers, during the pause, what the update must convert
//!    and rewrite in the paused program, or which value in which thread
//!    would go stale; [`heap`] traces the heap for it.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use upstare_patchgen::{plan::plan, version::Version};
//! let old = Arc::new(Version::initial(Arc::new(std::fs::read("kv-v1.wasm")?))?);
//! let plan = plan(old, Arc::new(std::fs::read("kv-v2.wasm")?))?;
//! for reason in &plan.refusals {
//!     eprintln!("refused: {reason}");
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod body;
pub mod constructors;
pub mod diff;
pub mod dwarf;
mod equivalence;
pub mod frames;
pub mod heap;
pub mod liveness;
pub mod module;
pub mod paused;
pub mod plan;
pub mod rebuild;
pub mod relink;
pub mod retreat;
pub mod symbolic;
pub mod version;
