//! Process-wide settings the command-line process makes before anything else runs. Only the
//! CLI makes them: the shared library leaves a host application's allocator and environment
//! alone (the ComfyUI pack sets the spin limit itself, before loading the library).

/// Spins of candle's CPU worker threads before they park, read once by candle from
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`. candle's default (25 000) keeps a worker spinning after
/// every elementwise op, taking a core from the BLAS tasks that follow: with 1000, a
/// Qwen3-0.6B CPU training step measured 2.9 s instead of 3.2 s and encoding 5% faster.
/// A value the user set is kept.
const SPIN_LIMIT: &str = "1000";

pub fn tune_process() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Still single-threaded here: nothing reads the environment concurrently.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT);
    }
    keep_freed_memory();
}

/// glibc malloc tuning. A training step allocates and frees the same few hundred activation
/// and gradient buffers every time, most of them 0.1-30 MB. With glibc's defaults the freed
/// top of the heap is handed back to the kernel (trim threshold) and the next step faults
/// every page in again, zeroed: measured ~0.5 s of a 3.8 s Qwen3-0.6B CPU step, most of the
/// process's system time. This keeps up to 2 GiB of freed memory mapped (a step's graph at
/// 2x256 tokens is over 1 GiB), and pins the mmap
/// threshold at glibc's dynamic maximum (setting the trim threshold would otherwise reset
/// it to 128 KiB).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
