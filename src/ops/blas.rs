//! A system BLAS for the CPU's large f32 products, loaded at run time.
//!
//! candle's pure-Rust GEMM is the one piece of the CPU forward pass that an optimised BLAS
//! (OpenBLAS, MKL, BLIS) clearly beats on the LLM's projection shapes, and `transformers`
//! runs on MKL. The library is opened with `dlopen` rather than linked, so qwenclip builds
//! and runs on a machine without one (candle's GEMM is then used) and picks one up when it is
//! there: OpenBLAS (Debian/Ubuntu `libopenblas0`), Intel's `libmkl_rt`, or BLIS.
//!
//! The BLAS runs single-threaded and each product is split by output columns over the rayon
//! pool that candle's other kernels use: a BLAS's own thread pool spins (`sched_yield`)
//! between calls and fights rayon for the cores, which cost more than its faster kernel saved.
//!
//! `QWENCLIP_BLAS`: unset = try the usual library names; a path = that library; `off` =
//! always candle's GEMM. Read once per process.

use libloading::Library;
use once_cell::sync::Lazy;

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;
/// Widest output-column block of a split product. Each block packs the whole left operand
/// again, so wider is cheaper; 512 was fastest on Qwen3-0.6B (256: +3% at 256 tokens, 1024
/// leaves the 1024-wide K/V products on one thread) and gives Qwen3-4B's products 2-20 tasks.
const COLUMN_BLOCK: usize = 512;
/// Tallest row block of a product split by rows (one too narrow to split by columns).
const ROW_BLOCK: usize = 256;

/// CBLAS `sgemm` (LP64: 32-bit integers).
type Sgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

/// A loaded BLAS. Kept for the life of the process (the symbols point into it).
pub struct Blas {
    _lib: Library,
    sgemm: Sgemm,
    /// Library file name, for reports (`bench-encode`).
    pub name: String,
}

/// Names tried when `QWENCLIP_BLAS` is unset, best first. Reference (netlib) BLAS is left out
/// on purpose: it is slower than candle's GEMM.
const CANDIDATES: &[&str] = &[
    "libopenblas.so.0",
    "libopenblas.so",
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "libblis.so.4",
    "libopenblas.dylib",
    "libopenblas.dll",
];

static BLAS: Lazy<Option<Blas>> = Lazy::new(|| match std::env::var("QWENCLIP_BLAS") {
    Ok(v) if matches!(v.trim(), "off" | "none" | "0" | "candle") => None,
    Ok(v) if !v.trim().is_empty() => {
        let b = open(v.trim());
        if b.is_none() {
            eprintln!("qwenclip: QWENCLIP_BLAS={v} has no usable cblas_sgemm; using candle's GEMM");
        }
        b
    }
    _ => CANDIDATES.iter().find_map(|n| open(n)),
});

/// The process's BLAS, if one was found.
pub fn get() -> Option<&'static Blas> {
    BLAS.as_ref()
}

/// What the CPU's large f32 products run on, for reports.
pub fn describe() -> String {
    get().map_or_else(|| "candle gemm".to_string(), |b| b.name.clone())
}

fn open(path: &str) -> Option<Blas> {
    // SAFETY: loading a BLAS runs only its initialisers, which set up its thread pool.
    let lib = unsafe { Library::new(path) }.ok()?;
    let file = std::path::Path::new(path)
        .file_name()
        .map_or(path.into(), |f| f.to_string_lossy().into_owned());
    // SAFETY: the symbol types are CBLAS's documented signatures for these names.
    unsafe {
        let single_threaded = |names: &[&[u8]]| {
            for name in names {
                if let Ok(set) = lib.get::<unsafe extern "C" fn(i32)>(name) {
                    set(1);
                }
            }
        };
        let sgemm = *lib.get::<Sgemm>(b"cblas_sgemm\0").ok()?;
        single_threaded(&[
            b"openblas_set_num_threads\0",
            b"MKL_Set_Num_Threads\0",
            b"bli_thread_set_num_threads\0",
        ]);
        Some(Blas {
            sgemm,
            name: file,
            _lib: lib,
        })
    }
}

impl Blas {
    /// Whether CBLAS's 32-bit integers can describe the product.
    pub fn fits(&self, (m, n, k): (usize, usize, usize)) -> bool {
        [m, n, k].iter().all(|&d| d <= i32::MAX as usize)
    }

    /// `batch` row-major products `op(a) @ op(b)` stored back to back: `op(a)` is `a[k,m]`
    /// transposed when `a_transposed`, else `a[m,k]`; `op(b)` is `b[n,k]` transposed when
    /// `b_transposed`, else `b[k,n]`. Returns `c[batch,m,n]`. The BLAS writes every element
    /// (beta = 0), so the result is never zeroed first.
    pub fn product(
        &self,
        batch: usize,
        (m, n, k): (usize, usize, usize),
        (a, a_transposed): (&[f32], bool),
        (b, b_transposed): (&[f32], bool),
    ) -> Vec<f32> {
        assert!(a.len() == batch * m * k && b.len() == batch * n * k);
        let ops = Operands {
            a_transposed,
            b_transposed,
        };
        self.checked_into(batch, (m, n, k), (a, b, ops), None)
    }

    /// One product `op(a) @ op(b)` (as [`Blas::product`]) plus `addend`, a second product
    /// over a small inner dimension (a LoRA's rank), computed inside each block of the first
    /// so that it is split over the cores too and its output block is still in cache.
    pub fn product_plus(
        &self,
        (m, n, k): (usize, usize, usize),
        (a, a_transposed): (&[f32], bool),
        (b, b_transposed): (&[f32], bool),
        addend: Addend<'_>,
    ) -> Vec<f32> {
        assert!(a.len() == m * k && b.len() == n * k);
        assert!(addend.a.len() == m * addend.k && addend.b.len() == n * addend.k);
        let ops = Operands {
            a_transposed,
            b_transposed,
        };
        self.checked_into(1, (m, n, k), (a, b, ops), Some(addend))
    }

    fn checked_into(
        &self,
        batch: usize,
        (m, n, k): (usize, usize, usize),
        (a, b, ops): (&[f32], &[f32], Operands),
        addend: Option<Addend<'_>>,
    ) -> Vec<f32> {
        let k2 = addend.as_ref().map_or(0, |x| x.k);
        assert!(
            self.fits((m, n, k.max(k2))),
            "BLAS dimensions exceed its integer type"
        );
        let len = batch * m * n;
        let mut c: Vec<f32> = Vec::with_capacity(len);
        let cp = c.spare_capacity_mut().as_mut_ptr() as *mut f32;
        if k == 0 {
            // SAFETY: `cp` points to `len` floats of capacity; all-zero bits are 0.0.
            unsafe { cp.write_bytes(0, len) };
            if let Some(x) = addend.filter(|x| x.k > 0 && len > 0) {
                // SAFETY: `c` is initialised (zeros) and the addend's sizes were checked.
                unsafe {
                    self.gemm(
                        (m, n, x.k),
                        (x.a.as_ptr(), x.k, false),
                        x.b(x.b.as_ptr(), n),
                        1.0,
                        (cp, n),
                    )
                }
            }
        } else if len > 0 {
            // SAFETY: `cp` has room for batch * m * n floats; a and b sizes checked above.
            unsafe { self.batched_into(batch, (m, n, k), (a, b, ops), addend, cp) };
        }
        // SAFETY: every one of the `len` elements was written above.
        unsafe { c.set_len(len) };
        c
    }

    /// [`Blas::product`] into `c`: one product per rayon task, or blocks of the one.
    ///
    /// # Safety
    /// `c` must have room for `batch * m * n` floats that nobody else touches meanwhile;
    /// `k > 0` and the sizes of `a`, `b` and the addend checked; an addend only with batch 1.
    unsafe fn batched_into(
        &self,
        batch: usize,
        (m, n, k): (usize, usize, usize),
        (a, b, ops): (&[f32], &[f32], Operands),
        addend: Option<Addend<'_>>,
        c: *mut f32,
    ) {
        use rayon::prelude::*;
        if batch == 1 {
            // SAFETY: forwarded from the caller.
            return unsafe { self.split_into((m, n, k), (a, b, ops), addend, c) };
        }
        let c_addr = c as usize;
        (0..batch).into_par_iter().for_each(|i| {
            // SAFETY: product i reads its own a and b blocks and writes its own c block.
            unsafe {
                self.gemm(
                    (m, n, k),
                    ops.a(a.as_ptr().add(i * m * k), m, k),
                    ops.b(b.as_ptr().add(i * n * k), n, k),
                    0.0,
                    ((c_addr as *mut f32).add(i * m * n), n),
                )
            }
        });
    }

    /// One product split over the rayon pool: by output columns, or by output rows when
    /// there are too few columns to split (a LoRA's rank-wide products).
    ///
    /// # Safety
    /// As [`Blas::batched_into`] with `batch` = 1.
    unsafe fn split_into(
        &self,
        (m, n, k): (usize, usize, usize),
        (a, b, ops): (&[f32], &[f32], Operands),
        addend: Option<Addend<'_>>,
        c: *mut f32,
    ) {
        // Blocks of a size fixed by the shape (a multiple of the kernels' register width),
        // not one per thread: a BLAS may accumulate edge columns in another order, so the
        // blocks must depend on the shape alone for results to be the same on any number of
        // cores. An even number of equal blocks of at most ~COLUMN_BLOCK columns: 768 columns
        // as 2 x 384, not 512 + 256, which would leave one of two cores idle a third of the time.
        let small = m * n * k < 1 << 18;
        let by_rows = !small && n < 2 * 16 && m >= 2 * 16;
        let (len, max_block) = if by_rows {
            (m, ROW_BLOCK)
        } else {
            (n, COLUMN_BLOCK)
        };
        let per = if small {
            n
        } else {
            let blocks = len.div_ceil(max_block).next_multiple_of(2);
            len.div_ceil(blocks).next_multiple_of(16)
        };
        let blocks: Vec<(usize, usize)> = (0..len)
            .step_by(per)
            .map(|j| (j, (j + per).min(len)))
            .collect();
        let c_addr = c as usize;
        let run = |&(j0, j1): &(usize, usize)| {
            let c = c_addr as *mut f32;
            let (ap, lda, at) = ops.a(a.as_ptr(), m, k);
            let (bp, ldb, bt) = ops.b(b.as_ptr(), n, k);
            // SAFETY: the blocks write disjoint row or column ranges of `c` (row stride n);
            // `a`, `b` and the addend are only read; sizes were checked by the caller.
            unsafe {
                if by_rows {
                    // A's block starts at row j0 of a[m,k], or column j0 of a[k,m] (transposed).
                    let a_off = if at { j0 } else { j0 * k };
                    let rows = (j1 - j0, n, k);
                    self.gemm(
                        rows,
                        (ap.add(a_off), lda, at),
                        (bp, ldb, bt),
                        0.0,
                        (c.add(j0 * n), n),
                    );
                    if let Some(x) = &addend {
                        let rows = (j1 - j0, n, x.k);
                        let a2 = (x.a.as_ptr().add(j0 * x.k), x.k, false);
                        self.gemm(rows, a2, x.b(x.b.as_ptr(), n), 1.0, (c.add(j0 * n), n));
                    }
                } else {
                    // B's block starts at row j0 of b[n,k] (transposed) or column j0 of b[k,n].
                    let b_off = if bt { j0 * k } else { j0 };
                    let cols = (m, j1 - j0, k);
                    self.gemm(
                        cols,
                        (ap, lda, at),
                        (bp.add(b_off), ldb, bt),
                        0.0,
                        (c.add(j0), n),
                    );
                    if let Some(x) = &addend {
                        let (b2, ldb2, bt2) = x.b(x.b.as_ptr(), n);
                        let b2_off = if bt2 { j0 * x.k } else { j0 };
                        let cols = (m, j1 - j0, x.k);
                        let a2 = (x.a.as_ptr(), x.k, false);
                        self.gemm(cols, a2, (b2.add(b2_off), ldb2, bt2), 1.0, (c.add(j0), n));
                    }
                }
            }
        };
        if blocks.len() == 1 {
            run(&blocks[0]);
        } else {
            use rayon::prelude::*;
            blocks.par_iter().for_each(run);
        }
    }

    /// One single-threaded CBLAS call: `c[m,n] = op(a) @ op(b) + beta c`. Each operand is
    /// `(pointer, leading dimension, transposed)`: `op(a)` is `[m,k]` (stored `[k,m]` when
    /// transposed), `op(b)` is `[k,n]` (stored `[n,k]` when transposed); `c` is
    /// `(pointer, leading dimension)`.
    ///
    /// # Safety
    /// The pointers must cover the matrices so described and `c` must not be written by
    /// anyone else meanwhile; the dimensions must pass [`Blas::fits`]. With `beta` = 0, `c`
    /// may be uninitialised.
    pub unsafe fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        (a, lda, ta): (*const f32, usize, bool),
        (b, ldb, tb): (*const f32, usize, bool),
        beta: f32,
        (c, ldc): (*mut f32, usize),
    ) {
        let op = |t: bool| if t { TRANS } else { NO_TRANS };
        // SAFETY (caller): the pointers cover the described matrices; dimensions fit.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a,
                lda as i32,
                b,
                ldb as i32,
                beta,
                c,
                ldc as i32,
            )
        }
    }
}

/// A second product added into [`Blas::product_plus`]'s result: `a` `[m, k]` (not
/// transposed) times `b`, stored `[n, k]` when `b_transposed`, else `[k, n]`.
pub struct Addend<'a> {
    pub k: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub b_transposed: bool,
}

impl Addend<'_> {
    /// `(pointer, leading dimension, transposed)` of `op(b)` `[k, n]`.
    fn b(&self, p: *const f32, n: usize) -> (*const f32, usize, bool) {
        let ld = if self.b_transposed { self.k } else { n };
        (p, ld, self.b_transposed)
    }
}

/// How [`Blas::product`]'s dense operands are stored.
#[derive(Clone, Copy)]
struct Operands {
    a_transposed: bool,
    b_transposed: bool,
}

impl Operands {
    /// `(pointer, leading dimension, transposed)` of a dense `op(a)` `[m,k]`.
    fn a(&self, p: *const f32, m: usize, k: usize) -> (*const f32, usize, bool) {
        (p, if self.a_transposed { m } else { k }, self.a_transposed)
    }

    /// `(pointer, leading dimension, transposed)` of a dense `op(b)` `[k,n]`.
    fn b(&self, p: *const f32, n: usize, k: usize) -> (*const f32, usize, bool) {
        (p, if self.b_transposed { k } else { n }, self.b_transposed)
    }
}
