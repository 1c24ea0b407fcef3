//! A version of a program as the updater knows it: the module as it was
//! built (its code, relocations and DWARF, which describe it in its own
//! address space), and its [`Layout`]: where its data symbols and table slots
//! really are in the running program, which differs from the module's own
//! addresses once it has been relinked against an earlier version.
//!
//! Symbols are matched across versions by [`SymbolKey`], never by index or
//! address: a name, plus the compile unit for `static` symbols (whose names
//! repeat across files), plus an ordinal for the rare names that still
//! repeat.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::dwarf::DebugInfo;
use crate::module::{ModuleInfo, SymbolTarget};

/// Why a module cannot be used as a version.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The module's structure (linking section, relocations) is unusable.
    #[error(transparent)]
    Module(#[from] crate::module::Error),
    /// The module's DWARF is unusable.
    #[error(transparent)]
    Dwarf(#[from] crate::dwarf::Error),
}

/// What identifies a symbol (data or function) across versions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SymbolKey {
    /// The symbol's name.
    pub name: String,
    /// The compile unit of a local (`static`) symbol, from DWARF.
    pub unit: Option<String>,
    /// Position among symbols with the same name and unit, in symbol-table
    /// order (0 for all but repeated names).
    pub ordinal: u32,
}

impl std::fmt::Display for SymbolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some(unit) = &self.unit {
            write!(f, " ({unit})")?;
        }
        if self.ordinal > 0 {
            write!(f, " #{}", self.ordinal + 1)?;
        }
        Ok(())
    }
}

/// Where a version's data and functions are in the running program.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Final address of each defined data symbol, by symbol index.
    pub data: HashMap<u32, u32>,
    /// Table slot -> function index.
    pub table: BTreeMap<u32, u32>,
}

/// A version of the program: its module and where its state lives.
#[derive(Debug, Clone)]
pub struct Version {
    /// The module as built (not relinked, not instrumented).
    pub wasm: Arc<Vec<u8>>,
    /// Its structure.
    pub info: ModuleInfo,
    /// Its DWARF (empty without `-g`).
    pub debug: DebugInfo,
    /// Where its data and table slots are.
    pub layout: Layout,
    /// Keys of its defined data symbols, by symbol index.
    pub data_keys: HashMap<u32, SymbolKey>,
    /// Keys of its functions, by function index.
    pub function_keys: Vec<SymbolKey>,
}

impl Version {
    /// A version running at the addresses its module was linked for: the
    /// first version of a program.
    pub fn initial(wasm: Arc<Vec<u8>>) -> Result<Version, Error> {
        let mut version = Version::unplaced(wasm)?;
        version.layout = Layout {
            data: version
                .info
                .symbols
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.data().map(|d| (i as u32, d.address)))
                .collect(),
            table: version.info.table.as_ref().map(|t| t.slots.clone()).unwrap_or_default(),
        };
        Ok(version)
    }

    /// A version whose layout the planner has yet to decide.
    pub fn unplaced(wasm: Arc<Vec<u8>>) -> Result<Version, Error> {
        let info = ModuleInfo::parse(&wasm)?;
        let debug = DebugInfo::parse(&wasm)?;
        let data_keys = data_keys(&info, &debug);
        let function_keys = function_keys(&info);
        Ok(Version { wasm, info, debug, layout: Layout::default(), data_keys, function_keys })
    }

    /// The function with this key, if the version has one.
    pub fn function_by_key(&self, key: &SymbolKey) -> Option<u32> {
        self.function_keys.iter().position(|k| k == key).map(|i| i as u32)
    }

    /// The table slot each function occupies in the running program.
    pub fn slots_by_function(&self) -> HashMap<u32, u32> {
        self.layout.table.iter().map(|(slot, f)| (*f, *slot)).collect()
    }
}

fn data_keys(info: &ModuleInfo, debug: &DebugInfo) -> HashMap<u32, SymbolKey> {
    let mut seen: HashMap<(String, Option<String>), u32> = HashMap::new();
    let mut keys = HashMap::new();
    for (i, symbol) in info.symbols.iter().enumerate() {
        let (Some(name), SymbolTarget::Data(Some(def))) = (&symbol.name, &symbol.target) else {
            continue;
        };
        // The file name alone: DW_AT_name is the path clang was given, which
        // differs between two checkouts of the same program.
        let unit = if symbol.is_local() {
            debug.global_at(def.address).map(|g| file_name(&g.cu))
        } else {
            None
        };
        let ordinal = seen.entry((name.clone(), unit.clone())).or_insert(0);
        keys.insert(i as u32, SymbolKey { name: name.clone(), unit, ordinal: *ordinal });
        *ordinal += 1;
    }
    keys
}

fn file_name(path: &str) -> String {
    path.rsplit(['/', '\\']).next().unwrap_or(path).to_string()
}

fn function_keys(info: &ModuleInfo) -> Vec<SymbolKey> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    (0..info.functions.len() as u32)
        .map(|f| {
            let name = info.function_name(f);
            let ordinal = seen.entry(name.clone()).or_insert(0);
            let key = SymbolKey { name, unit: None, ordinal: *ordinal };
            *ordinal += 1;
            key
        })
        .collect()
}
