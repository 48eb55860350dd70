//! The library's global allocator (`qwenclip::allocator`, on by default): freed blocks of
//! 1-256 MiB are kept and handed out again for the same size, zeroed when asked, never
//! twice, within the byte bound; a miss returns the oldest kept blocks first; `release`
//! returns all. One test, so nothing else in this process allocates large blocks meanwhile.
#![cfg(feature = "allocator")]

use std::alloc::{alloc_zeroed, dealloc, realloc, Layout};
use std::hint::black_box;

use qwenclip::allocator::{kept_bytes, release, MAX_KEPT};

const MIB: usize = 1 << 20;

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 64).unwrap()
}

/// `std::alloc::alloc`, with its result kept observable: the compiler may remove an
/// allocation whose pointer is only ever freed.
unsafe fn alloc(layout: Layout) -> *mut u8 {
    black_box(std::alloc::alloc(layout))
}

#[test]
fn freed_large_blocks_are_reused_zeroed_bounded_and_released() {
    release();
    assert_eq!(kept_bytes(), 0);

    // Kept on free, handed out again for the same layout, and zeroed when asked.
    let size = 3 * MIB + 4096;
    unsafe {
        let p = alloc(layout(size));
        std::ptr::write_bytes(p, 0xAB, size);
        dealloc(p, layout(size));
        assert_eq!(kept_bytes(), size, "a freed 3 MiB block is kept");
        let q = alloc_zeroed(layout(size));
        assert_eq!(q, p, "the kept block comes back for the same size");
        assert_eq!(kept_bytes(), 0);
        let s = std::slice::from_raw_parts(q, size);
        assert!(
            s.iter().all(|&b| b == 0),
            "a reused block is zeroed for alloc_zeroed"
        );

        // Another size or alignment does not take it: a miss first returns at least its
        // own size of kept blocks, the oldest first.
        dealloc(q, layout(size));
        let aligned = Layout::from_size_align(size, 4096).unwrap();
        let a = alloc(aligned);
        assert_eq!(kept_bytes(), 0, "a miss returned the kept block");
        dealloc(a, aligned);
        assert_eq!(kept_bytes(), size);
        release();
        let blocks: Vec<*mut u8> = [1, 2, 3].iter().map(|&m| alloc(layout(m * MIB))).collect();
        for (&p, m) in blocks.iter().zip([1, 2, 3]) {
            dealloc(p, layout(m * MIB));
        }
        assert_eq!(kept_bytes(), 6 * MIB);
        let big = alloc(layout(5 * MIB / 2));
        assert_eq!(
            kept_bytes(),
            3 * MIB,
            "the 1 and 2 MiB blocks (oldest) went back"
        );
        let again = alloc(layout(3 * MIB));
        assert_eq!(again, blocks[2], "the 3 MiB block was kept");
        dealloc(again, layout(3 * MIB));
        dealloc(big, layout(5 * MIB / 2));

        // A reused block grows and shrinks like any other.
        release();
        let p = alloc(layout(size));
        dealloc(p, layout(size));
        let q = alloc(layout(size));
        std::ptr::write_bytes(q, 7, size);
        let r = realloc(q, layout(size), 2 * size);
        assert!(std::slice::from_raw_parts(r, size).iter().all(|&b| b == 7));
        let r = realloc(r, layout(2 * size), MIB / 2);
        assert!(std::slice::from_raw_parts(r, MIB / 2)
            .iter()
            .all(|&b| b == 7));
        dealloc(r, layout(MIB / 2));
    }

    // Small and huge blocks go straight back to the system.
    release();
    drop(black_box(vec![1u8; MIB - 1]));
    drop(black_box(Vec::<u8>::with_capacity(256 * MIB + 1)));
    assert_eq!(kept_bytes(), 0);

    // At most MAX_KEPT bytes are kept (blocks are not touched: no memory is used).
    let block = 256 * MIB;
    let n = MAX_KEPT / block + 2;
    let blocks: Vec<*mut u8> = (0..n).map(|_| unsafe { alloc(layout(block)) }).collect();
    for &p in &blocks {
        unsafe { dealloc(p, layout(block)) };
    }
    assert_eq!(kept_bytes(), MAX_KEPT / block * block);
    release();
    assert_eq!(kept_bytes(), 0);

    // Threads allocating and freeing the same sizes never share a block.
    let sizes = [MIB, 2 * MIB, 5 * MIB + 8];
    std::thread::scope(|s| {
        for t in 0..4u8 {
            s.spawn(move || {
                for round in 0..200usize {
                    let size = sizes[(round + t as usize) % sizes.len()];
                    let mut v = vec![t; size];
                    v[size / 2] = t;
                    std::thread::yield_now();
                    assert!(v.iter().all(|&b| b == t), "a block was handed out twice");
                    drop(v);
                    let z = vec![0u8; size];
                    assert!(z.iter().all(|&b| b == 0));
                }
            });
        }
    });
    assert!(kept_bytes() <= MAX_KEPT);
    release();
    assert_eq!(kept_bytes(), 0);
}
