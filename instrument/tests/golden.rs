//! Golden tests of the instrumenter's output: every `tests/golden/NAME.wat`
//! is instrumented and its output written out as text beside it, in
//! `NAME.golden`: the metadata, the offset map and the module (without the
//! two custom sections that hold them in binary). Any change to what the
//! instrumenter emits fails here and shows as a diff; a change meant to
//! alter the output is blessed with
//!
//! ```sh
//! UPSTARE_BLESS=1 cargo test -p upstare-instrument --test golden
//! ```
//!
//! and the rewritten `.golden` files are reviewed with the change. A `.wat`
//! whose first line is `;; options: ...` is instrumented with those
//! options: `unwind_only`, `stress`.

use std::path::{Path, PathBuf};

use upstare_instrument::abi::{self, offsets::OffsetMap};
use upstare_instrument::{instrument, Options};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The options a test module's first line asks for.
fn options_of(source: &str) -> Options {
    let mut options = Options::default();
    let Some(line) = source.lines().next().and_then(|l| l.strip_prefix(";; options:")) else {
        return options;
    };
    for word in line.split_whitespace() {
        match word {
            "unwind_only" => options.unwind_only = true,
            "stress" => options.stress = true,
            other => panic!("unknown option {other:?}"),
        }
    }
    options
}

/// The instrumented module as text: what the golden files hold.
fn render(source: &str) -> String {
    let wasm = wat::parse_str(source).expect("the test module parses");
    let out = instrument(&wasm, &options_of(source)).expect("the test module instruments");
    let offsets = OffsetMap::from_module(&out.wasm).expect("an offset map");
    let module = wasmprinter::print_bytes(&out.wasm).expect("the output prints");
    let binary_sections = [abi::METADATA_SECTION, abi::offsets::SECTION].map(|s| format!("(@custom \"{s}\""));
    let module: Vec<&str> = module.lines().filter(|l| !binary_sections.iter().any(|s| l.trim_start().starts_with(s))).collect();
    format!(
        ";; Written by `UPSTARE_BLESS=1 cargo test -p upstare-instrument --test golden`.\n\
         ;; metadata\n{};; offset map\n{:?}\n;; module\n{}\n",
        metadata(&out.metadata),
        offsets,
        module.join("\n")
    )
}

/// The metadata, a line for the module, each function and each resume
/// point.
fn metadata(meta: &abi::Metadata) -> String {
    let mut text = format!("{:?}\n", abi::Metadata { functions: Vec::new(), ..meta.clone() });
    for f in &meta.functions {
        text += &format!("function {} type {} locals {:?}\n", f.index, f.type_index, f.locals);
        for rp in &f.resume_points {
            text += &format!("  {rp:?}\n");
        }
    }
    text
}

#[test]
fn the_output_of_every_golden_module_is_as_recorded() {
    let bless = std::env::var_os("UPSTARE_BLESS").is_some_and(|v| v == "1");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    inputs.sort();
    for golden in inputs.iter().filter(|p| p.extension().is_some_and(|e| e == "golden")) {
        assert!(golden.with_extension("wat").exists(), "{} has no .wat: remove it", golden.display());
    }
    let wats: Vec<&PathBuf> = inputs.iter().filter(|p| p.extension().is_some_and(|e| e == "wat")).collect();
    assert!(wats.len() >= 3, "the golden modules are missing: {wats:?}");
    let mut failed = Vec::new();
    for wat in wats {
        let got = render(&std::fs::read_to_string(wat).unwrap());
        let golden = wat.with_extension("golden");
        if bless {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != got {
            let diff = similar::TextDiff::from_lines(&want, &got);
            eprintln!("{}", diff.unified_diff().context_radius(3).header("recorded", "now"));
            failed.push(golden.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "the instrumenter's output changed for {failed:?} (diff above); if that is meant, run \
         `UPSTARE_BLESS=1 cargo test -p upstare-instrument --test golden` and review the files"
    );
}
