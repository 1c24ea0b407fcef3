//! Function fingerprints across two real versions of a C program: v2 adds a
//! global, a string literal and a function in front of the others, which
//! renumbers functions and moves data; untouched functions must keep equal
//! fingerprints and the edited one must not.

mod support;

use upstare_patchgen::body::{fingerprint, shadow_frame_size, Error, Fingerprint};
use upstare_patchgen::module::ModuleInfo;

const V1: &str = r#"
int counter;
int scale = 3;
__attribute__((noinline)) int helper(int x) { return x * scale + counter; }
__attribute__((noinline)) int edited(int x) { return helper(x) + 1; }
__attribute__((noinline)) const char *label(int i) { return &"label"[i & 1]; }
__attribute__((noinline)) int framed(int n) {
    volatile int buf[8];
    for (int i = 0; i < 8; i++) buf[i] = i * n;
    return buf[n & 7];
}
int main(void) { counter = edited(2) + label(counter)[0] + framed(3); return counter; }
"#;

const V2: &str = r#"
int added_global = 5;
int counter;
int scale = 3;
__attribute__((noinline)) const char *added(int x) { return x + added_global ? "new" : "old"; }
__attribute__((noinline)) int helper(int x) { return x * scale + counter; }
__attribute__((noinline)) int edited(int x) { return helper(x) + 2; }
__attribute__((noinline)) const char *label(int i) { return &"label"[i & 1]; }
__attribute__((noinline)) int framed(int n) {
    volatile int buf[8];
    for (int i = 0; i < 8; i++) buf[i] = i * n;
    return buf[n & 7];
}
int main(void) {
    counter = edited(2) + label(counter)[0] + framed(3) + added(counter)[0];
    return counter;
}
"#;

struct Version {
    wasm: Vec<u8>,
    info: ModuleInfo,
}

impl Version {
    fn build(name: &str, source: &str) -> Version {
        let wasm = support::build_c(name, source, &[]);
        let info = ModuleInfo::parse(&wasm).unwrap();
        Version { wasm, info }
    }

    fn func(&self, name: &str) -> u32 {
        // `int main(void)` is compiled as `__original_main`.
        let wanted = if name == "main" {
            "__original_main"
        } else {
            name
        };
        let i = self
            .info
            .functions
            .iter()
            .position(|f| f.name.as_deref() == Some(wanted));
        i.unwrap_or_else(|| panic!("no function {name}")) as u32
    }

    fn print(&self, name: &str) -> Fingerprint {
        fingerprint(&self.info, &self.wasm, self.func(name)).unwrap()
    }

    fn address(&self, name: &str) -> u32 {
        self.info.symbols[self.info.symbol_named(name).unwrap()]
            .data()
            .unwrap()
            .address
    }
}

fn versions() -> (Version, Version) {
    (Version::build("body_v1", V1), Version::build("body_v2", V2))
}

#[test]
fn untouched_functions_keep_their_fingerprint_when_everything_moves() {
    let (v1, v2) = versions();
    // The test means something only if indices and addresses did move.
    assert_ne!(v1.func("helper"), v2.func("helper"));
    assert_ne!(v1.address("scale"), v2.address("scale"));
    assert_ne!(v1.address("counter"), v2.address("counter"));
    for name in ["helper", "label", "framed"] {
        assert_eq!(
            v1.print(name),
            v2.print(name),
            "{name} is the same code in both versions"
        );
    }
}

#[test]
fn edited_and_caller_functions_differ() {
    let (v1, v2) = versions();
    assert_ne!(v1.print("edited"), v2.print("edited"));
    assert_ne!(v1.print("main"), v2.print("main"));
}

#[test]
fn fingerprints_name_what_relocated_fields_refer_to() {
    use upstare_patchgen::body::Ref;
    let (v1, _) = versions();
    let helper = v1.print("helper");
    let data: Vec<_> = helper
        .refs
        .iter()
        .filter_map(|r| match r {
            Ref::Data { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        data.contains(&"scale") && data.contains(&"counter"),
        "{helper:?}"
    );
    let edited = v1.print("edited");
    assert!(
        edited.refs.contains(&Ref::Function("helper".into())),
        "{edited:?}"
    );
    let label = v1.print("label");
    assert!(
        label
            .refs
            .iter()
            .any(|r| matches!(r, Ref::Literal { bytes, .. } if bytes == b"label\0")),
        "{label:?}"
    );
}

#[test]
fn a_function_keeping_an_array_in_memory_has_a_shadow_frame() {
    let (v1, v2) = versions();
    let size =
        shadow_frame_size(&v1.info, &v1.wasm, v1.func("framed")).expect("framed has a frame");
    // buf[8] of int, and the shadow stack keeps 16-byte alignment.
    assert!(size >= 8 * 4 && size.is_multiple_of(16), "frame of {size} bytes");
    assert_eq!(
        Some(size),
        shadow_frame_size(&v2.info, &v2.wasm, v2.func("framed"))
    );
    assert_eq!(
        shadow_frame_size(&v1.info, &v1.wasm, v1.func("helper")),
        None
    );
}

#[test]
fn imports_and_bad_indices_have_no_fingerprint() {
    let (v1, _) = versions();
    let count = v1.info.functions.len() as u32;
    assert!(matches!(
        fingerprint(&v1.info, &v1.wasm, count),
        Err(Error::NoBody { .. })
    ));
    if v1.info.imported_functions > 0 {
        assert!(matches!(
            fingerprint(&v1.info, &v1.wasm, 0),
            Err(Error::NoBody { .. })
        ));
    }
    let short = &v1.wasm[..v1.info.code_section as usize + 4];
    let main = v1.func("main");
    assert!(matches!(
        fingerprint(&v1.info, short, main),
        Err(Error::Truncated { .. })
    ));
    assert_eq!(shadow_frame_size(&v1.info, short, v1.func("framed")), None);
}
