//! What both command-line programs share: `qwenclip` (through `src/cli/`) and the developer
//! tools `qwenclip-dev` (`src/bin/qwenclip-dev/`, which includes this folder by path). Only
//! external crates are named here, so it compiles the same inside either binary.

pub mod args;
pub mod tuning;

/// The body of both `main`s: tunes the process, runs the command, and on failure prints the
/// error as sentences with their cause chain and exits with status 1 (clap exits with 2 on a
/// usage error before `run` returns).
pub fn main(run: impl FnOnce() -> anyhow::Result<()>) {
    tuning::tune_process();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            eprintln!("  caused by: {c}");
            cause = c.source();
        }
        std::process::exit(1);
    }
}
