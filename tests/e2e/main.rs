//! End-to-end tests: real C guests built by the documented toolchain, run
//! by the real `upstare-host` binary (or its library, for interruption),
//! talked to by real TCP clients on loopback.

mod chains;
mod checkpoint;
mod cli;
mod compute;
mod control;
mod csmith;
mod demo;
mod embed;
mod files;
mod frames;
mod fresh_memory;
mod futex_lowering;
mod guests;
mod handler;
mod heap;
mod interrupt;
mod kv;
mod pipes;
mod processes;
mod random_pauses;
mod rebuild;
mod releases;
mod retreat;
mod rollback;
mod snapshot;
mod snapshot_decode;
mod statuses;
mod stress;
mod stress_benches;
mod stress_update;
mod threads;
mod transform;
mod update;
