//! Which functions can be on the stack when the program pauses.
//!
//! A function can unwind if it can call itself (through any chain of calls:
//! its entry is then a resume point, and the entries of a feedback set of
//! such functions are update points, or deep recursion without loops would
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
    /// The function is on a cycle of calls: its entry is a resume point, so
    /// that a rewind can start it over.
    pub recursive: Vec<bool>,
    /// Its entry is also an update point, checked on every call: a set of
    /// the recursive functions that every cycle of calls passes through
    /// ([`entry_checks`]).
    pub entry_checked: Vec<bool>,
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
        let edges = call_edges(info, &by_sig);
        let mut callers: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (from, callees) in edges.iter().enumerate() {
            for &to in callees {
                callers[to as usize].push(from as u32);
            }
        }
        let recursive = on_cycles(info, &edges);
        let entry_checked = entry_checks(info, &edges, &recursive);
        let loops = Loops::scan(info)?;
        let mut g = CallGraph {
            blocking,
            can_unwind: recursive.clone(),
            recursive,
            entry_checked,
            indirect: HashMap::new(),
            by_sig,
            bounded: loops.counted(info),
        };
        // Loops only ever lose their exemption, functions only ever become
        // able to unwind: this ends.
        loop {
            g.unwind_closure(info, &callers);
            if !loops.shrink(info, &g.can_unwind, &g.blocking, &mut g.bounded) {
                return Ok(g);
            }
        }
    }

    /// Which functions can unwind, given the bounded loops: the recursive
    /// ones, those with a live loop that is not bounded, and, walking up
    /// `callers` (the call edges reversed, a `call_indirect` calling every
    /// escaping function of its type), every caller of a blocking import
    /// or of a function that can unwind. One walk, where re-checking every
    /// site until nothing changes took a pass per level of calls.
    fn unwind_closure(&mut self, info: &ModuleInfo<'_>, callers: &[Vec<u32>]) {
        self.can_unwind.clone_from(&self.recursive);
        let mut work: Vec<u32> = (0..self.blocking.len() as u32).filter(|&f| self.blocking[f as usize]).collect();
        for body in &info.bodies {
            let unbounded_loop = |s: &Site| {
                s.live && matches!(s.kind, SiteKind::Loop { .. }) && !self.bounded.contains(&(body.func, s.op_index))
            };
            if self.can_unwind[body.func as usize] || body.sites.iter().any(unbounded_loop) {
                self.can_unwind[body.func as usize] = true;
                work.push(body.func);
            }
        }
        while let Some(callee) = work.pop() {
            for &caller in &callers[callee as usize] {
                if !self.can_unwind[caller as usize] {
                    self.can_unwind[caller as usize] = true;
                    work.push(caller);
                }
            }
        }
        self.refresh_indirect(info);
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

/// Each function's callees, sorted, counting a `call_indirect` as a call to
/// every escaping function of its type.
fn call_edges(info: &ModuleInfo<'_>, by_sig: &HashMap<FuncType, Vec<u32>>) -> Vec<Vec<u32>> {
    let mut edges: Vec<Vec<u32>> = vec![Vec::new(); info.func_types.len()];
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
    edges
}

/// Which functions lie on a cycle of the call graph.
fn on_cycles(info: &ModuleInfo<'_>, edges: &[Vec<u32>]) -> Vec<bool> {
    let n = edges.len();
    let mut cyclic = vec![false; n];
    for component in cycles(edges, &vec![true; n], 0..n as u32) {
        for w in component {
            cyclic[w as usize] = true;
        }
    }
    // Imports have no body: they are never on a cycle of this module's code.
    for c in cyclic.iter_mut().take(info.num_imported_funcs as usize) {
        *c = false;
    }
    cyclic
}

/// The recursive functions whose entries are update points: a *feedback
/// set*, so that every cycle of calls passes through one of them and a
/// recursion reaches an update point within one turn of any of its cycles.
/// The other recursive functions run no check when called; their entries
/// stay resume points, so a frame unwound at the entry of a version that
/// checked it still has somewhere to rewind to in one that does not.
///
/// The smallest such set is hard to find; this takes, in each strongly
/// connected part of the graph, the function that the most cycles are likely
/// to pass through (calls in times calls out, within the part), the largest
/// body on a tie (a check costs it least against its work), and repeats on
/// what is left of the part without it until no cycle remains.
fn entry_checks(info: &ModuleInfo<'_>, edges: &[Vec<u32>], recursive: &[bool]) -> Vec<bool> {
    let n = edges.len();
    // Every part is made of recursive functions: calls of the others count
    // for nothing here, and leaving them out saves a third of the walks in
    // SQLite, whose largest part (1,112 functions) takes about 190 picks.
    let edges: Vec<Vec<u32>> =
        edges.iter().map(|e| e.iter().copied().filter(|&w| recursive[w as usize]).collect()).collect();
    let edges = &edges[..];
    let mut size = vec![0usize; n];
    for body in &info.bodies {
        size[body.func as usize] = body.range.end - body.range.start;
    }
    let mut checked = vec![false; n];
    let mut parts = cycles(edges, recursive, (0..n as u32).filter(|&f| recursive[f as usize]));
    let mut in_part = vec![false; n];
    // Position of each member of the part at hand, `NONE` for the others.
    const NONE: u32 = u32::MAX;
    let mut position = vec![NONE; n];
    while let Some(part) = parts.pop() {
        let self_call = part.iter().copied().find(|&f| edges[f as usize].binary_search(&f).is_ok());
        let pick = self_call.unwrap_or_else(|| {
            for (i, &f) in part.iter().enumerate() {
                position[f as usize] = i as u32;
            }
            let (mut calls_in, mut calls_out) = (vec![0u64; part.len()], vec![0u64; part.len()]);
            for (i, &f) in part.iter().enumerate() {
                for &w in &edges[f as usize] {
                    let j = position[w as usize];
                    if j != NONE {
                        calls_out[i] += 1;
                        calls_in[j as usize] += 1;
                    }
                }
            }
            for &f in &part {
                position[f as usize] = NONE;
            }
            let best = (0..part.len())
                .max_by_key(|&i| (calls_in[i] * calls_out[i], size[part[i] as usize], std::cmp::Reverse(part[i])))
                .expect("a cycle has members");
            part[best]
        });
        checked[pick as usize] = true;
        // What is left of the part may still hold cycles, among its own
        // members only: the other parts are dealt with on their own.
        for &f in &part {
            in_part[f as usize] = f != pick;
        }
        parts.extend(cycles(edges, &in_part, part.iter().copied()));
        for &f in &part {
            in_part[f as usize] = false;
        }
    }
    checked
}

/// The strongly connected components of the graph restricted to `alive`
/// functions, reached from `roots`, that hold a cycle (more than one
/// member, or one that calls itself). Tarjan's algorithm, iterative so that
/// deep call chains cannot overflow the host's stack.
fn cycles(edges: &[Vec<u32>], alive: &[bool], roots: impl Iterator<Item = u32>) -> Vec<Vec<u32>> {
    let n = edges.len();
    const UNSEEN: u32 = u32::MAX;
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let mut found = Vec::new();
    let mut next = 0u32;
    for root in roots {
        if index[root as usize] != UNSEEN || !alive[root as usize] {
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
                if !alive[wu] {
                    continue;
                }
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
                if members.len() > 1 || edges[vu].binary_search(&v).is_ok() {
                    found.push(members);
                }
            }
        }
    }
    found
}
