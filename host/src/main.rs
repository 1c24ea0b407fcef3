//! The `upstare-host` binary: a thin CLI over the library.

fn main() -> std::process::ExitCode {
    upstare_host::cli::main()
}
