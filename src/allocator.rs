//! The library's global allocator: the system's, except that freed large blocks are kept
//! for the next allocation of the same size.
//!
//! A training step allocates and frees the same few hundred gradient and activation buffers
//! every time (a tiny student's resampler alone: 216 MB of weight gradients). glibc hands
//! blocks over 32 MB, and the freed top of its heap, back to the kernel, so the next step
//! faults every page in again, zeroed, with a TLB shootdown per copy-on-write: 0.14 s of a
//! 0.37 s host-judged step of the tiny student (`tests/comfyui/bench.py --vision`). The CLI
//! tunes glibc for the whole process instead (`cli::shared::tuning`); the library must leave
//! a host's allocator alone, so it keeps its own freed blocks, and only those.
//!
//! Kept blocks are returned to the system ([`release`]) after the C ABI loads weights (an
//! encoder, an adapter, a run's judge: their temporaries are never asked for again), when a
//! run or an encoder is freed or offloaded, and when the host asks for memory back; a freed
//! block that would take the kept bytes past [`MAX_KEPT`] goes back at once, and a large
//! allocation that finds no block of its size first returns as many kept bytes (the oldest),
//! so keeping adds little to a step's peak memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Smallest block kept: below it glibc's own free lists already reuse memory.
const MIN_BLOCK: usize = 1 << 20;
/// Largest block kept: bigger ones are weights (an embedding table), freed once.
const MAX_BLOCK: usize = 256 << 20;
/// Most bytes kept at once (a Qwen3-0.6B training step's graph at 2x256 tokens is ~1 GiB).
pub const MAX_KEPT: usize = 2 << 30;
/// Most blocks kept at once; a step's distinct large buffers number in the hundreds.
const SLOTS: usize = 1024;

#[derive(Clone, Copy)]
struct Block {
    ptr: *mut u8,
    layout: Layout,
}

struct Kept {
    blocks: [Block; SLOTS],
    len: usize,
    bytes: usize,
}

// SAFETY: the blocks are unused allocations owned by the cache alone; the mutex serializes
// every access to them.
unsafe impl Send for Kept {}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    blocks: [Block {
        ptr: ptr::null_mut(),
        layout: Layout::new::<u8>(),
    }; SLOTS],
    len: 0,
    bytes: 0,
});

/// Allocations over this many bytes fail ([`refuse_above`]).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

fn refused(size: usize) -> bool {
    size > LIMIT.load(Ordering::Relaxed)
}

fn kept() -> MutexGuard<'static, Kept> {
    // Nothing panics while holding the lock; a poisoned one still holds consistent data.
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

fn eligible(layout: Layout) -> bool {
    (MIN_BLOCK..=MAX_BLOCK).contains(&layout.size())
}

impl Kept {
    /// The most recently kept block of exactly this layout (warmest in the caches).
    fn take(&mut self, layout: Layout) -> Option<*mut u8> {
        let i = self.blocks[..self.len]
            .iter()
            .rposition(|b| b.layout == layout)?;
        let block = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= layout.size();
        Some(block.ptr)
    }

    fn keep(&mut self, ptr: *mut u8, layout: Layout) -> bool {
        if self.len == SLOTS || self.bytes + layout.size() > MAX_KEPT {
            return false;
        }
        self.blocks[self.len] = Block { ptr, layout };
        self.len += 1;
        self.bytes += layout.size();
        true
    }

    /// Returns the oldest kept blocks to the system, at least `bytes` of them (or all).
    fn evict(&mut self, bytes: usize) {
        let mut freed = 0;
        let mut n = 0;
        while n < self.len && freed < bytes {
            let b = self.blocks[n];
            // SAFETY: a kept block is an unused `System` allocation of `b.layout`.
            unsafe { System.dealloc(b.ptr, b.layout) };
            freed += b.layout.size();
            n += 1;
        }
        self.blocks.copy_within(n..self.len, 0);
        self.len -= n;
        self.bytes -= freed;
    }
}

/// A kept block for `layout`, or `None` after making room: a large allocation that finds
/// no block of its size first returns at least as many kept bytes to the system, so keeping
/// never raises the peak above what the system allocator alone would reach by more than
/// the blocks a step is about to ask for again.
fn reuse(layout: Layout) -> Option<*mut u8> {
    if layout.size() < MIN_BLOCK {
        return None;
    }
    let mut kept = kept();
    if eligible(layout) {
        if let Some(p) = kept.take(layout) {
            return Some(p);
        }
    }
    kept.evict(layout.size());
    None
}

/// [`System`], keeping freed blocks of 1-256 MiB for reuse (see the module).
pub struct Reusing;

// SAFETY: every pointer handed out is a live `System` allocation of exactly the requested
// layout, either fresh or kept (never handed out twice) after the caller freed it.
unsafe impl GlobalAlloc for Reusing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refused(layout.size()) {
            return ptr::null_mut();
        }
        match reuse(layout) {
            Some(p) => p,
            None => System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refused(layout.size()) {
            return ptr::null_mut();
        }
        match reuse(layout) {
            Some(p) => {
                ptr::write_bytes(p, 0, layout.size());
                p
            }
            None => System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if eligible(layout) && kept().keep(ptr, layout) {
            return;
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refused(new_size) {
            return ptr::null_mut();
        }
        // Every block, kept or not, is a `System` allocation of `layout`.
        System.realloc(ptr, layout, new_size)
    }
}

/// Returns every kept block to the system.
pub fn release() {
    kept().evict(usize::MAX);
}

/// Makes every later allocation of more than `bytes` fail (Rust then aborts with an
/// allocation error), as a fuzzer's malloc limit does: the stable replay of the fuzz
/// regressions uses it to catch a size read from a header that nothing bounded.
pub fn refuse_above(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// Bytes of freed blocks kept for reuse.
pub fn kept_bytes() -> usize {
    kept().bytes
}
