//! The move of a paused thread from its module's unwind-only variant to the
//! full one, right before its first rewind.
//!
//! A module loads as the unwind-only variant ([`crate::LoadOptions::lazy_rewind`]):
//! its bodies can reach update points and save frames, but hold none of the
//! code that enters them again, which is about as much code again and most
//! of the compile time. The full variant has the same metadata, so the
//! frames the thread saved, its globals and its memories are those a fresh
//! instance of the full variant would rewind from: the thread goes on in
//! such an instance, in a store of its own with its WASI state moved over,
//! as an update moves it to a new version (without one's plan, because
//! nothing changes), and keeps it from then on.

use crate::module::one_line;
use crate::Guest;

impl Guest {
    /// Puts this thread, unwound, on an instance of its module's full
    /// variant, if it runs the unwind-only one: the same globals, frames
    /// and memories, the frames left paused for the caller to rewind. The
    /// full variant compiles here if no one asked for it before
    /// ([`crate::GuestModule::rewinding`]). On failure the thread is left
    /// as it was.
    pub(crate) fn make_rewindable(&mut self) -> Result<(), String> {
        if !self.module.is_unwind_only() {
            return Ok(());
        }
        let full = self.module.rewinding().map_err(|e| e.to_string())?;
        let (globals, frames) = self.unwound_state().map_err(|e| e.to_string())?;
        let u = self.unwinder.as_ref().ok_or("the module cannot unwind")?;
        let (memory, control, metadata) = (u.memory.clone(), u.control.clone(), u.metadata.clone());
        let instance_pre = crate::update::link(self.store.engine(), &full, &memory, &control).map_err(|e| one_line(&e))?;
        let previous = self.switch_to(&full, &instance_pre, metadata).map_err(|e| e.to_string())?;
        let carried = self.resume_thread(&globals, &frames).map_err(|e| e.to_string()).and_then(|()| {
            // The memory holds the program already: the data segments go unused.
            let drop_data = self.instance.get_typed_func::<(), ()>(&mut self.store, upstare_instrument::abi::exports::DROP_DATA);
            drop_data.and_then(|f| f.call(&mut self.store, ())).map_err(|e| one_line(&e))
        });
        if let Err(e) = carried {
            self.switch_back(previous);
            return Err(e);
        }
        tracing::debug!("resumes on the full variant of {}", self.module.path().display());
        Ok(())
    }
}
