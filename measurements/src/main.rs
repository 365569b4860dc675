//! The `cvm-measure` command line (definitions and subcommands in `cli/`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
