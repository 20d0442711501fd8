//! `cargo pgharness …` (or `cargo-pgharness …`): the commands of [`cargo_pgharness::Command`]
//! on the workspace of the current directory.

use std::process::ExitCode;

use clap::Parser;

/// cargo runs `cargo-pgharness pgharness <args>` for `cargo pgharness <args>`.
#[derive(Parser)]
#[command(name = "cargo", bin_name = "cargo")]
enum Cargo {
    /// pgharness: a migrated Postgres schema for every test, one command to run them.
    #[command(subcommand, version)]
    Pgharness(cargo_pgharness::Command),
}

fn main() -> ExitCode {
    cargo_pgharness::init_logging("CARGO_PGHARNESS_LOG");
    // Run directly (`cargo-pgharness test`), the command comes first.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|arg| arg != "pgharness") {
        args.insert(1, "pgharness".into());
    }
    let Cargo::Pgharness(command) = Cargo::parse_from(args);
    cargo_pgharness::block_on(command.run(&cargo_pgharness::workspace_root()))
}
