//! The `wdvirt` binary: parse the command line, run the action.

fn main() -> std::process::ExitCode {
    wdvirt::cli::main()
}
