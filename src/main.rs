//! `qwenclip`: the command-line face of the library. Errors are printed as sentences with
//! their cause chain; the exit code is 1 on any failure, 2 on a usage error.

mod cli;

fn main() {
    cli::shared::main(|| cli::run(cli::parse()));
}
