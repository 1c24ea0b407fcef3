//! Matching the functions of two versions by name and telling which
//! changed.
//!
//! A function is unchanged when its body is the same once every relocated
//! field is read as what it refers to (see [`crate::body`]): indices and
//! addresses may all have moved around it. Imports match by name too, so a
//! frame stopped at a call to `poll_oneoff` finds the same call in the new
//! version.

use std::collections::HashMap;

use crate::body;
use crate::version::Version;

/// How the functions of two versions correspond.
#[derive(Debug, Clone, Default)]
pub struct FunctionMatch {
    /// Old function index -> new function index, for every function (import
    /// or defined) present in both.
    pub old_to_new: HashMap<u32, u32>,
    /// Old defined functions whose body did not change.
    pub unchanged: Vec<u32>,
    /// Names of defined functions present in both whose body changed.
    pub changed: Vec<String>,
    /// Names of defined functions only the new version has.
    pub added: Vec<String>,
    /// Names of defined functions only the old version had.
    pub removed: Vec<String>,
}

impl FunctionMatch {
    /// Whether the old function `func` is unchanged in the new version.
    pub fn is_unchanged(&self, func: u32) -> bool {
        self.unchanged.binary_search(&func).is_ok()
    }
}

/// Matches the functions of `old` and `new`.
pub fn match_functions(old: &Version, new: &Version) -> Result<FunctionMatch, body::Error> {
    let mut m = FunctionMatch::default();
    let new_by_key: HashMap<_, _> = new.function_keys.iter().enumerate().map(|(i, k)| (k, i as u32)).collect();
    for (old_index, key) in old.function_keys.iter().enumerate() {
        let old_index = old_index as u32;
        let old_defined = old_index >= old.info.imported_functions;
        let Some(&new_index) = new_by_key.get(key) else {
            if old_defined {
                m.removed.push(key.to_string());
            }
            continue;
        };
        let new_defined = new_index >= new.info.imported_functions;
        if old_defined != new_defined {
            // A function that became an import (or the reverse) is a
            // different thing under the same name.
            if old_defined {
                m.removed.push(key.to_string());
            }
            continue;
        }
        m.old_to_new.insert(old_index, new_index);
        if !old_defined {
            continue;
        }
        let before = body::fingerprint(&old.info, &old.wasm, old_index)?;
        let after = body::fingerprint(&new.info, &new.wasm, new_index)?;
        if before == after {
            m.unchanged.push(old_index);
        } else {
            m.changed.push(key.to_string());
        }
    }
    let matched: std::collections::HashSet<u32> = m.old_to_new.values().copied().collect();
    for (new_index, key) in new.function_keys.iter().enumerate() {
        let new_index = new_index as u32;
        if new_index >= new.info.imported_functions && !matched.contains(&new_index) {
            m.added.push(key.to_string());
        }
    }
    m.unchanged.sort_unstable();
    Ok(m)
}
