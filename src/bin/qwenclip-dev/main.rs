//! `qwenclip-dev` (built with `--features dev`): the developer tools, off the user's
//! `qwenclip` command. The seeded tiny models and random real-size models of the tests, the
//! smoke run and the benchmarks, and the benchmarks themselves. Errors and exit codes are
//! `qwenclip`'s.

mod bench;
mod bench_ffi;
mod generate;
#[path = "../../cli/shared/mod.rs"]
mod shared;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qwenclip-dev",
    version,
    about = "qwenclip developer tools: seeded test models and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the seeded tiny Qwen3 (`OUT/model`), adapter (`OUT/adapter`), SDXL teacher (`OUT/teacher`) and a UNet of the teacher's widths (`OUT/unet`) for smoke runs and tests.
    Tiny(generate::TinyArgs),
    /// Write a Qwen3 of a real size with random weights (for benchmarks).
    RandomModel(generate::RandomModelArgs),
    /// Write an SDXL-shaped UNet with random weights, diffusers layout (for benchmarks).
    RandomUnet(generate::RandomUnetArgs),
    /// Time encoding (latency per batch size and length, peak memory) and print JSON.
    BenchEncode(bench::BenchArgs),
    /// Time training steps (samples/s, peak memory) and print JSON; `--objective vision`
    /// times vision-distillation steps through a UNet.
    BenchTrain(bench::BenchTrainArgs),
    /// Overhead of the C ABI over the Rust API for one encode, as JSON.
    BenchFfi(bench_ffi::BenchFfiArgs),
}

fn main() {
    shared::main(|| match Cli::parse().cmd {
        Command::Tiny(a) => generate::run_tiny(a),
        Command::RandomModel(a) => generate::run_random_model(a),
        Command::RandomUnet(a) => generate::run_random_unet(a),
        Command::BenchEncode(a) => bench::run(a),
        Command::BenchTrain(a) => bench::run_train(a),
        Command::BenchFfi(a) => bench_ffi::run(a),
    });
}
