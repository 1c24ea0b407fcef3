//! Benchmarks live in `benches/`; see `docs/PERFORMANCE.md` for the figures,
//! the commands that produced them and the machine.
