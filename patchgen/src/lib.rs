//! `upstare-patchgen` compares the running version of a program with its
//! next version and plans the update. (Header to be written with the plan.)

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod body;
pub mod dwarf;
pub mod liveness;
pub mod module;
pub mod relink;
