//! Which functions can be on the stack when the program pauses.
//!
//! A function can unwind if it can call itself (through any chain of calls:
//! its entry is then an update point, or deep recursion without loops would
//! never reach one), has a reachable loop that is not bounded (see
//! `bound`), a reachable call to a blocking
//! import, a reachable direct call to a function that can unwind, or a
//! reachable `call_indirect` whose type matches a function that can unwind
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
use crate::bound::Loops;
use crate::error::Result;

/// Result of the analysis, indexed by function index.
pub(crate) struct CallGraph {
    /// The function is a blocking import.
    pub blocking: Vec<bool>,
    /// The function can be on the stack during an unwind.
    pub can_unwind: Vec<bool>,
    /// The function is on a cycle of calls: its entry is an update point.
    pub recursive: Vec<bool>,
    /// For each type index used by a `call_indirect`: whether some escaping
    /// function of that type can unwind or blocks.
    indirect: HashMap<u32, bool>,
    /// Escaping functions grouped by signature.
    by_sig: HashMap<FuncType, Vec<u32>>,
    /// Bounded loops, as (function, operator index of the `loop`): their
    /// headers are no update points.
    pub bounded: HashSet<(u32, u32)>,
}

impl CallGraph {
    /// Computes the fixpoint. `blocking` is the set of (module, name) imports
    /// at which the host may pause.
    pub fn new(info: &ModuleInfo<'_>, blocking_names: &HashSet<(String, String)>) -> Result<CallGraph> {
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
        let recursive = on_cycles(info, &by_sig);
        let loops = Loops::scan(info)?;
        let mut g = CallGraph {
            blocking,
            can_unwind: recursive.clone(),
            recursive,
            indirect: HashMap::new(),
            by_sig,
            bounded: loops.counted(info),
        };
        // Loops only ever lose their exemption, functions only ever become
        // able to unwind: this ends.
        loop {
            g.unwind_fixpoint(info);
            if !loops.shrink(info, &g.can_unwind, &g.blocking, &mut g.bounded) {
                return Ok(g);
            }
        }
    }

    /// Which functions can unwind, given the bounded loops.
    fn unwind_fixpoint(&mut self, info: &ModuleInfo<'_>) {
        self.can_unwind.clone_from(&self.recursive);
        loop {
            let mut changed = false;
            self.refresh_indirect(info);
            for body in &info.bodies {
                if !self.can_unwind[body.func as usize]
                    && body.sites.iter().any(|s| self.resume_kind(body.func, s).is_some())
                {
                    self.can_unwind[body.func as usize] = true;
                    changed = true;
                }
            }
            if !changed {
                return;
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

    /// If the site, in function `func`, is a resume point, its kind.
    pub fn resume_kind(&self, func: u32, site: &Site) -> Option<crate::abi::ResumeKind> {
        use crate::abi::ResumeKind;
        if !site.live {
            return None;
        }
        match site.kind {
            SiteKind::Loop { .. } if self.bounded.contains(&(func, site.op_index)) => None,
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

/// Which functions lie on a cycle of the call graph, counting a
/// `call_indirect` as a call to every escaping function of its type.
/// Tarjan's algorithm, iterative so that deep call chains cannot overflow
/// the host's stack.
fn on_cycles(info: &ModuleInfo<'_>, by_sig: &HashMap<FuncType, Vec<u32>>) -> Vec<bool> {
    let n = info.func_types.len();
    let mut edges: Vec<Vec<u32>> = vec![Vec::new(); n];
    for body in &info.bodies {
        let from = &mut edges[body.func as usize];
        for s in body.sites.iter().filter(|s| s.live) {
            match s.kind {
                SiteKind::Call { func } => from.push(func),
                SiteKind::CallIndirect { ty } => {
                    if let Some(fs) = by_sig.get(&info.types[ty as usize]) {
                        from.extend(fs);
                    }
                }
                _ => {}
            }
        }
        from.sort_unstable();
        from.dedup();
    }
    const UNSEEN: u32 = u32::MAX;
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let mut cyclic = vec![false; n];
    let mut next = 0u32;
    for root in 0..n as u32 {
        if index[root as usize] != UNSEEN {
            continue;
        }
        // (function, position in its edge list)
        let mut work: Vec<(u32, usize)> = vec![(root, 0)];
        index[root as usize] = next;
        low[root as usize] = next;
        next += 1;
        stack.push(root);
        on_stack[root as usize] = true;
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            let vu = v as usize;
            if let Some(&w) = edges[vu].get(*i) {
                *i += 1;
                let wu = w as usize;
                if index[wu] == UNSEEN {
                    index[wu] = next;
                    low[wu] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[wu] = true;
                    work.push((w, 0));
                } else if on_stack[wu] {
                    low[vu] = low[vu].min(index[wu]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent as usize] = low[parent as usize].min(low[vu]);
            }
            if low[vu] == index[vu] {
                let mut members = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w as usize] = false;
                    members.push(w);
                    if w == v {
                        break;
                    }
                }
                let self_loop = edges[vu].binary_search(&v).is_ok();
                if members.len() > 1 || self_loop {
                    for w in members {
                        cyclic[w as usize] = true;
                    }
                }
            }
        }
    }
    // Imports have no body: they are never on a cycle of this module's code.
    for c in cyclic.iter_mut().take(info.num_imported_funcs as usize) {
        *c = false;
    }
    cyclic
}
