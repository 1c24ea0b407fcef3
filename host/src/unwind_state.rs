//! The changes of an instrumented instance's unwind state that the host makes:
//! ending an unwind, starting a rewind, abandoning one, and unwinding from
//! a host import. The guest makes the others itself (it starts unwinding at
//! an update point, and ends a rewind at its resume point). Each writes the
//! `upstare_state` global and the control header as
//! `upstare_instrument::abi` lays them out; the instance exports no code
//! for them, which wasmtime would otherwise compile, with a trampoline
//! each, in every module.

use upstare_instrument::abi::{exports, State};
use wasmtime::{AsContextMut, Global, Instance, Ref, Table, Val};

use crate::pause::ControlMemory;

/// The unwind state of one instrumented instance.
#[derive(Clone)]
pub struct UnwindState {
    state: Global,
    control: ControlMemory,
    /// The side tables of saved references, which an abandoned rewind
    /// releases, each with its null.
    side_tables: Vec<(Table, Ref)>,
    /// Whether the instance has the code that rewinds: the unwind-only
    /// variant's would run its bodies from the top in the rewinding state.
    rewinds: bool,
}

impl UnwindState {
    /// The unwind state of `instance`, an instance of an instrumented module
    /// over `control`; `rewinds` is false for the unwind-only variant.
    pub(crate) fn of(mut store: impl AsContextMut, instance: &Instance, control: ControlMemory, rewinds: bool) -> wasmtime::Result<Self> {
        let state = instance
            .get_global(&mut store, exports::STATE)
            .ok_or_else(|| wasmtime::format_err!("no `{}` global", exports::STATE))?;
        let side_tables = [(exports::FUNCREF_TABLE, Ref::Func(None)), (exports::EXTERNREF_TABLE, Ref::Extern(None))]
            .into_iter()
            .filter_map(|(name, null)| Some((instance.get_table(&mut store, name)?, null)))
            .collect();
        Ok(UnwindState { state, control, side_tables, rewinds })
    }

    /// Whether the guest is in `state`.
    pub(crate) fn is(&self, store: impl AsContextMut, state: State) -> bool {
        self.state.get(store).i32() == Some(state as i32)
    }

    fn set(&self, store: impl AsContextMut, state: State) -> wasmtime::Result<()> {
        self.state.set(store, Val::I32(state as i32))
    }

    /// From inside a host import: the guest unwinds as soon as the import
    /// returns (the rewind calls it again).
    pub(crate) fn unwind(&self, store: impl AsContextMut) -> wasmtime::Result<()> {
        self.set(store, State::Unwinding)
    }

    /// Once the entry call returned with the frames saved: normal again.
    pub(crate) fn stop_unwind(&self, store: impl AsContextMut) -> wasmtime::Result<()> {
        self.set(store, State::Normal)
    }

    /// Before calling the unwound entry point again: the guest re-enters
    /// its frames, outermost first.
    pub(crate) fn start_rewind(&self, store: impl AsContextMut) -> wasmtime::Result<()> {
        if !self.rewinds {
            return Err(wasmtime::format_err!("the unwind-only variant of a module cannot rewind (a bug in UpStare, please report it)"));
        }
        self.control.set_rewinding(true);
        self.set(store, State::Rewinding)
    }

    /// Abandons a rewind: normal state, an empty frame stack, and the saved
    /// references released.
    pub(crate) fn stop_rewind(&self, mut store: impl AsContextMut) -> wasmtime::Result<()> {
        self.set(&mut store, State::Normal)?;
        self.control.set_rewinding(false);
        for (table, null) in &self.side_tables {
            let size = table.size(&mut store);
            table.fill(&mut store, 0, null.clone(), size)?;
        }
        self.control.clear_frames();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstare_instrument::abi::{self, control};
    use wasmtime::{Linker, Module, Store};

    /// A loop that counts to 100, with a funcref live across it so that
    /// frames hold a reference, instrumented as `variant` and instantiated
    /// over fresh memories; the pause is requested.
    fn paused_counter(unwind_only: bool) -> (Store<()>, Instance, ControlMemory) {
        let wat = r#"(module
          (table 1 funcref)
          (elem declare func $count)
          (func $count (export "count") (result i32)
            (local $i i32) (local $f funcref)
            ref.func $count
            local.set $f
            (loop $l
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br_if $l (i32.ne (local.get $i) (i32.const 100))))
            i32.const 0
            local.get $f
            table.set 0
            local.get $i))"#;
        let options = upstare_instrument::Options { unwind_only, ..Default::default() };
        let out = upstare_instrument::instrument(&wat::parse_str(wat).unwrap(), &options).unwrap();
        let engine = crate::new_engine().unwrap();
        let module = Module::new(&engine, &out.wasm).unwrap();
        let mut store = Store::new(&engine, ());
        let memory = crate::program_memory::ProgramMemory::new(&engine, &out.metadata.memory).unwrap();
        let control = ControlMemory::new(&engine, control::Header::default()).unwrap();
        let mut linker = Linker::new(&engine);
        linker.define(&store, abi::IMPORT_MODULE, abi::MEMORY_IMPORT, memory.shared().clone()).unwrap();
        linker.define(&store, abi::IMPORT_MODULE, abi::CONTROL_IMPORT, control.memory().clone()).unwrap();
        let instance = linker.instantiate(&mut store, &module).unwrap();
        control.set_pause(true);
        (store, instance, control)
    }

    fn count(store: &mut Store<()>, instance: &Instance) -> i32 {
        instance.get_typed_func::<(), i32>(&mut *store, "count").unwrap().call(&mut *store, ()).unwrap()
    }

    /// Unwound at the loop, the full variant rewinds into it and counts on;
    /// an abandoned rewind leaves no frame and no reference behind, and the
    /// call runs again from the start.
    #[test]
    fn the_host_ends_unwinds_and_starts_and_abandons_rewinds() {
        let (mut store, instance, control) = paused_counter(false);
        let state = UnwindState::of(&mut store, &instance, control.clone(), true).unwrap();
        let refs = instance.get_table(&mut store, exports::FUNCREF_TABLE).expect("a funcref side table");
        count(&mut store, &instance);
        assert!(state.is(&mut store, State::Unwinding));
        state.stop_unwind(&mut store).unwrap();
        assert_eq!(control.frames().unwrap().len(), 1);
        assert!(refs.get(&mut store, 0).is_some_and(|r| !r.is_null()), "the frame's funcref is held");
        control.set_pause(false);
        state.start_rewind(&mut store).unwrap();
        assert_eq!(count(&mut store, &instance), 100);
        assert!(state.is(&mut store, State::Normal));

        control.set_pause(true);
        count(&mut store, &instance);
        state.stop_unwind(&mut store).unwrap();
        control.set_pause(false);
        state.start_rewind(&mut store).unwrap();
        state.stop_rewind(&mut store).unwrap();
        assert!(state.is(&mut store, State::Normal));
        assert!(control.frames().unwrap().is_empty());
        assert!(refs.get(&mut store, 0).is_some_and(|r| r.is_null()), "the reference is released");
        assert_eq!(count(&mut store, &instance), 100);
    }

    /// The unwind-only variant has no code that rewinds: starting a rewind
    /// in it is refused, and changes nothing.
    #[test]
    fn a_rewind_of_the_unwind_only_variant_is_refused() {
        let (mut store, instance, control) = paused_counter(true);
        let state = UnwindState::of(&mut store, &instance, control.clone(), false).unwrap();
        count(&mut store, &instance);
        state.stop_unwind(&mut store).unwrap();
        assert!(state.start_rewind(&mut store).is_err());
        assert!(state.is(&mut store, State::Normal));
        assert!(control.frames().unwrap().len() == 1, "the frames stay for the full variant");
    }
}
