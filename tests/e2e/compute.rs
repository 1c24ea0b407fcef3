//! The CPU-bound guest gives exactly the output of the same C source built
//! natively: deep recursion, heap use and all four value types behave the
//! same under the host.

use upstare_tests::{guest, native_build, run_host};

#[test]
fn compute_matches_a_native_build() {
    let native = native_build("guest-examples/compute/compute.c", "compute");
    let expected = std::process::Command::new(&native).output().unwrap();
    let _ = std::fs::remove_file(&native);
    assert!(expected.status.success());
    let out = run_host(&[guest("compute").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&expected.stdout));
}
