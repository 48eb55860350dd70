//! `qwenclip`: the command-line face of the library. Errors are printed as sentences with
//! their cause chain; the exit code is 1 on any failure, 2 on a usage error.

mod cli;

fn main() {
    cli::tuning::tune_process();
    let args = cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            eprintln!("  caused by: {c}");
            cause = c.source();
        }
        std::process::exit(1);
    }
}
