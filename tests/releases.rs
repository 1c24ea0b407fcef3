//! Real programs at their real releases: C sources that crates bundle
//! (SQLite's amalgamation in `libsqlite3-sys`, zstd in `zstd-sys`), one
//! release per crate version, each built with a server of ours
//! (`tests/releases/*-kv.c`) into a guest that the release chains update
//! live (`tests/e2e/releases.rs`, `docs/RELEASES.md`), and zstd's
//! multi-threaded compression with a driver of ours
//! (`tests/releases/zstd-mt.c`, run by `tests/e2e/threads.rs`); and Lua
//! 5.4 (`lua-src`) with a workload of ours (`tests/releases/lua-workload.c`,
//! run by the overhead bench and `tests/e2e/random_pauses.rs`).
//!
//! Each release has a manifest under `tests/releases/sources/` that is
//! never built: `cargo metadata` on it makes cargo fetch the crate's
//! sources (from crates.io, or its cache) and says where they are. Builds
//! take a while (SQLite: about 20 s each), so they are kept beside the
//! host binary, keyed by their sources and flags.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program whose releases the chains update through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// SQLite, embedded in `tests/releases/sqlite-kv.c`.
    Sqlite,
    /// zstd, embedded in `tests/releases/zstd-kv.c`.
    Zstd,
}

impl Program {
    /// Its releases, oldest first: consecutive releases that consecutive
    /// versions of the crate bundle (each manifest names the crate version).
    pub fn releases(self) -> &'static [&'static str] {
        match self {
            Program::Sqlite => &["3.53.1", "3.53.2", "3.54.0", "3.54.1"],
            Program::Zstd => &["1.5.4", "1.5.5", "1.5.6", "1.5.7"],
        }
    }

    /// The short name, in manifests' folder names and guests' names.
    pub fn name(self) -> &'static str {
        match self {
            Program::Sqlite => "sqlite",
            Program::Zstd => "zstd",
        }
    }

    /// The crate that bundles the sources.
    fn crate_name(self) -> &'static str {
        match self {
            Program::Sqlite => "libsqlite3-sys",
            Program::Zstd => "zstd-sys",
        }
    }

    /// The folder of the release's C sources (with its headers), fetched
    /// by cargo.
    pub fn sources(self, release: &str) -> PathBuf {
        let manifest = repo().join(format!("tests/releases/sources/{}-{release}/Cargo.toml", self.name()));
        assert!(manifest.exists(), "no manifest for {} {release}: {} is missing", self.name(), manifest.display());
        let package = crate_dir(&manifest, self.crate_name());
        match self {
            Program::Sqlite => package.join("sqlite3"),
            Program::Zstd => package.join("zstd/lib"),
        }
    }

    /// The server guest built against `release`, built now unless a build
    /// of the same sources and flags is kept.
    pub fn guest(self, release: &str) -> PathBuf {
        self.guest_with(release, &[])
    }

    /// [`Program::guest`] with the server's source built with `defines`
    /// (`-DNAME`), which select a variant of the server.
    pub fn guest_with(self, release: &str, defines: &[&str]) -> PathBuf {
        let (mut flags, mut sources, libs) = self.library(release);
        sources.push(repo().join(format!("tests/releases/{}-kv.c", self.name())));
        let variant = with_defines(&mut flags, defines);
        build(&format!("{}-kv{variant}-{release}", self.name()), &sources, &flags, libs)
    }

    /// The flags, the C sources and the libraries of the release's library,
    /// as every guest of it is built.
    fn library(self, release: &str) -> (Vec<String>, Vec<PathBuf>, &'static [&'static str]) {
        let dir = self.sources(release);
        let include = format!("-I{}", dir.display());
        // Every guest gets a 1 MiB shadow stack, as the benches' SQLite:
        // its parser and query planner recurse.
        let mut flags = vec!["-Wall".to_string(), "-Wl,-z,stack-size=1048576".to_string(), include];
        match self {
            Program::Sqlite => {
                flags.extend(SQLITE_WASI_FLAGS.iter().map(|f| f.to_string()));
                (flags, vec![dir.join("sqlite3.c")], SQLITE_WASI_LIBS)
            }
            Program::Zstd => {
                // The portable C decoder (no x86 assembly), no legacy
                // formats, single-threaded (zstd's default; [`zstd_mt`]
                // adds its threads).
                flags.extend(["-DZSTD_DISABLE_ASM", "-DZSTD_LEGACY_SUPPORT=0"].map(String::from));
                let mut sources = Vec::new();
                for part in ["common", "compress", "decompress"] {
                    sources.extend(c_files(&dir.join(part)));
                }
                (flags, sources, &[])
            }
        }
    }
}

/// zstd's multi-threaded compression at `release`: `tests/releases/zstd-mt.c`
/// (built with `defines`, `-DNAME`, which select its version) with the
/// library built with `-DZSTD_MULTITHREAD` (its pool of POSIX threads,
/// `lib/common/pool.c`) for wasi-threads (`upstare-cc --threads`). Built
/// now unless a build of the same sources and flags is kept.
pub fn zstd_mt(release: &str, defines: &[&str]) -> PathBuf {
    let (mut flags, mut sources, libs) = Program::Zstd.library(release);
    flags.extend(["--threads", "-DZSTD_MULTITHREAD"].map(String::from));
    sources.push(repo().join("tests/releases/zstd-mt.c"));
    let variant = with_defines(&mut flags, defines);
    build(&format!("zstd-mt{variant}-{release}"), &sources, &flags, libs)
}

/// The Lua workload: Lua 5.4's core with its base, table, string and math
/// libraries (the C sources the `lua-src` crate bundles, fetched through
/// `tests/releases/sources/lua-5.4.7`) and `tests/releases/lua-workload.c`,
/// whose script spreads its work over what a Lua program does. A real
/// interpreter nobody here wrote, whose opcode cases call helper functions.
/// Returns its sources, flags and libraries, for a build of it.
///
/// Lua raises errors with setjmp/longjmp, which wasm32-wasi has only with
/// exception handling: `LUAI_THROW` aborts instead (the workload raises
/// none), and `tests/releases/lua-shim` stands in for `<setjmp.h>`.
/// `l_signalT` is a plain int, as wasi-libc's `sig_atomic_t` needs its
/// signal emulation.
pub fn lua_recipe() -> (Vec<PathBuf>, Vec<String>, &'static [&'static str]) {
    let dir = crate_dir(&repo().join("tests/releases/sources/lua-5.4.7/Cargo.toml"), "lua-src").join("lua-5.4.7");
    let skipped = ["lua.c", "luac.c", "linit.c", "loslib.c", "liolib.c", "loadlib.c", "lcorolib.c", "ldblib.c"];
    let mut sources: Vec<PathBuf> =
        c_files(&dir).into_iter().filter(|p| !skipped.iter().any(|s| p.file_name().is_some_and(|n| n == *s))).collect();
    sources.push(repo().join("tests/releases/lua-workload.c"));
    let mut flags = vec![
        format!("-I{}", repo().join("tests/releases/lua-shim").display()),
        format!("-I{}", dir.display()),
    ];
    flags.extend(
        ["-DLUAI_THROW(L,c)=abort()", "-DLUAI_TRY(L,c,a)=a", "-Dluai_jmpbuf=int", "-Dl_signalT=int", "-D_WASI_EMULATED_PROCESS_CLOCKS"]
            .map(String::from),
    );
    (sources, flags, &["-lwasi-emulated-process-clocks"])
}

/// The Lua workload ([`lua_recipe`]) with a 1 MiB shadow stack, built now
/// unless a build of the same sources and flags is kept. Its argument is
/// the scale of its work; what it prints depends on that alone.
pub fn lua_workload() -> PathBuf {
    let (sources, mut flags, libs) = lua_recipe();
    flags.insert(0, "-Wl,-z,stack-size=1048576".into());
    build("lua-workload", &sources, &flags, libs)
}

/// The compression workload: bzip2 1.0.8 and LZ4 1.10.0 from the C
/// sources the `bzip2-sys` and `lz4-sys` crates bundle (fetched through
/// `tests/releases/sources/compressors`), driven by
/// `tests/releases/compress-workload.c`. Built now unless a build of the
/// same sources and flags is kept. Its arguments are rounds and KiB per
/// round; what it prints depends on them alone.
pub fn compress_workload() -> PathBuf {
    let manifest = repo().join("tests/releases/sources/compressors/Cargo.toml");
    let bzip2 = crate_dir(&manifest, "bzip2-sys").join("bzip2-1.0.8");
    let lz4 = crate_dir(&manifest, "lz4-sys").join("liblz4/lib");
    let mut sources: Vec<PathBuf> =
        ["blocksort.c", "bzlib.c", "compress.c", "crctable.c", "decompress.c", "huffman.c", "randtable.c"].map(|f| bzip2.join(f)).into();
    sources.extend(["lz4.c", "lz4hc.c"].map(|f| lz4.join(f)));
    sources.push(repo().join("tests/releases/compress-workload.c"));
    let flags = vec![format!("-I{}", bzip2.display()), format!("-I{}", lz4.display()), "-DBZ_NO_STDIO".into()];
    build("compress-workload", &sources, &flags, &[])
}

/// Adds `defines` to `flags` as `-DNAME`; returns what they add to the
/// build's name (`-name` each).
fn with_defines(flags: &mut Vec<String>, defines: &[&str]) -> String {
    flags.extend(defines.iter().map(|d| format!("-D{d}")));
    defines.iter().map(|d| format!("-{}", d.to_lowercase())).collect()
}

/// What SQLite needs to build for wasm32-wasi: no threads, no extension
/// loading, and wasi-libc's emulations of `mmap`, `getpid` and process
/// clocks, with their libraries ([`SQLITE_WASI_LIBS`]).
pub const SQLITE_WASI_FLAGS: &[&str] = &[
    "-DSQLITE_THREADSAFE=0",
    "-DSQLITE_OMIT_LOAD_EXTENSION",
    "-D_WASI_EMULATED_MMAN",
    "-D_WASI_EMULATED_GETPID",
    "-D_WASI_EMULATED_PROCESS_CLOCKS",
];

/// The libraries [`SQLITE_WASI_FLAGS`] link against.
pub const SQLITE_WASI_LIBS: &[&str] =
    &["-lwasi-emulated-mman", "-lwasi-emulated-getpid", "-lwasi-emulated-process-clocks"];

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The folder of `crate_name`'s sources, as `cargo metadata` on `manifest`
/// fetches and locates them (without building anything).
pub fn crate_dir(manifest: &Path, crate_name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--manifest-path"])
        .arg(manifest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} metadata: {e}"));
    assert!(
        output.status.success(),
        "cargo metadata on {} failed: {}",
        manifest.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let package = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == crate_name)
        .unwrap_or_else(|| panic!("{crate_name} is not in cargo metadata of {}", manifest.display()));
    let path = package["manifest_path"].as_str().unwrap_or_else(|| panic!("{crate_name} has no manifest_path"));
    Path::new(path).parent().expect("a manifest path has a folder").to_path_buf()
}

/// The `.c` files of a folder, sorted.
fn c_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    files.sort();
    files
}

/// Builds `sources` with `bin/upstare-cc FLAGS SOURCES LIBS` into the kept
/// builds, unless a build with the same key is there, and returns it. The
/// key covers the sources' contents, the flags and `upstare-cc` itself.
fn build(name: &str, sources: &[PathBuf], flags: &[String], libs: &[&str]) -> PathBuf {
    let mut h = DefaultHasher::new();
    for src in sources {
        std::fs::read(src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display())).hash(&mut h);
    }
    flags.hash(&mut h);
    libs.hash(&mut h);
    std::fs::read(repo().join("bin/upstare-cc")).expect("bin/upstare-cc is readable").hash(&mut h);
    let kept = crate::host_bin().with_file_name("release-guests");
    std::fs::create_dir_all(&kept).unwrap_or_else(|e| panic!("cannot create {}: {e}", kept.display()));
    let out = kept.join(format!("{name}-{:016x}.wasm", h.finish()));
    // One build at a time: tests run in parallel, and a build of SQLite
    // takes the machine's cores anyway.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if !out.exists() {
        // Other test processes may build it too: the rename makes a
        // complete file appear at once.
        let partial = out.with_extension(format!("{}.partial", std::process::id()));
        // At the lowest priority: the other tests of the suite run
        // meanwhile, some of them timing a pause.
        let status = Command::new("nice")
            .args(["-n", "19"])
            .arg(repo().join("bin/upstare-cc"))
            .args(flags)
            .args(sources)
            .args(libs)
            .arg("-o")
            .arg(&partial)
            .status()
            .unwrap_or_else(|e| panic!("cannot run nice (coreutils) bin/upstare-cc: {e}"));
        assert!(status.success(), "building {name} failed: {status}");
        std::fs::rename(&partial, &out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    }
    out
}
