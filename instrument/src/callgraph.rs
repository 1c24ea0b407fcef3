//! Which functions can be on the stack when the program pauses.
//!
//! A function can unwind if it has a reachable loop, a reachable call to a
//! blocking import, a reachable direct call to a function that can unwind, or
//! a reachable `call_indirect` whose type matches a function that can unwind
//! (or a blocking import) which could be in a table. The least fixpoint of
//! these rules is computed; every other function is copied byte for byte.
//!
//! "Could be in a table" is over-approximated by "escapes": named in an
//! element segment or by `ref.func`, or exported (the host could put an
//! exported function in a table with `Table::set`). That stays sound when
//! tables are imported, exported, grown or set, because a funcref to one of
//! this module's functions can only come from one of those three places.

use std::collections::{HashMap, HashSet};

use wasmparser::FuncType;

use crate::analysis::{ModuleInfo, Site, SiteKind};

/// Result of the analysis, indexed by function index.
pub(crate) struct CallGraph {
    /// The function is a blocking import.
    pub blocking: Vec<bool>,
    /// The function can be on the stack during an unwind.
    pub can_unwind: Vec<bool>,
    /// For each type index used by a `call_indirect`: whether some escaping
    /// function of that type can unwind or blocks.
    indirect: HashMap<u32, bool>,
    /// Escaping functions grouped by signature.
    by_sig: HashMap<FuncType, Vec<u32>>,
}

impl CallGraph {
    /// Computes the fixpoint. `blocking` is the set of (module, name) imports
    /// at which the host may pause.
    pub fn new(info: &ModuleInfo<'_>, blocking_names: &HashSet<(String, String)>) -> CallGraph {
        let n = info.func_types.len();
        let mut blocking = vec![false; n];
        let mut f = 0usize;
        for imp in &info.imports {
            if matches!(imp.ty, wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_)) {
                blocking[f] = blocking_names.contains(&(imp.module.to_string(), imp.name.to_string()));
                f += 1;
            }
        }
        let mut by_sig: HashMap<FuncType, Vec<u32>> = HashMap::new();
        for (func, &esc) in info.escaping.iter().enumerate() {
            if esc {
                by_sig.entry(info.func_type(func as u32).clone()).or_default().push(func as u32);
            }
        }
        let mut g = CallGraph {
            blocking: blocking.clone(),
            can_unwind: vec![false; n],
            indirect: HashMap::new(),
            by_sig,
        };
        loop {
            let mut changed = false;
            g.refresh_indirect(info);
            for body in &info.bodies {
                if !g.can_unwind[body.func as usize]
                    && body.sites.iter().any(|s| g.resume_kind(info, s).is_some())
                {
                    g.can_unwind[body.func as usize] = true;
                    changed = true;
                }
            }
            if !changed {
                return g;
            }
        }
    }

    fn refresh_indirect(&mut self, info: &ModuleInfo<'_>) {
        let mut types: HashSet<u32> = HashSet::new();
        for body in &info.bodies {
            for s in &body.sites {
                if let SiteKind::CallIndirect { ty } = s.kind {
                    types.insert(ty);
                }
            }
        }
        for t in types {
            let sig = &info.types[t as usize];
            let hit = self.by_sig.get(sig).is_some_and(|fs| {
                fs.iter().any(|&f| self.blocking[f as usize] || self.can_unwind[f as usize])
            });
            self.indirect.insert(t, hit);
        }
    }

    /// If the site is a resume point, its kind.
    pub fn resume_kind(&self, _info: &ModuleInfo<'_>, site: &Site) -> Option<crate::abi::ResumeKind> {
        use crate::abi::ResumeKind;
        if !site.live {
            return None;
        }
        match site.kind {
            SiteKind::Loop { .. } => Some(ResumeKind::Loop),
            SiteKind::Call { func } if self.blocking[func as usize] => Some(ResumeKind::BlockingCall),
            SiteKind::Call { func } if self.can_unwind[func as usize] => Some(ResumeKind::Call),
            SiteKind::CallIndirect { ty } if self.indirect.get(&ty).copied().unwrap_or(false) => {
                Some(ResumeKind::CallIndirect)
            }
            _ => None,
        }
    }
}
