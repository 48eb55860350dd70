//! Quantized products on the CPU as llama.cpp computes them: the activations quantized to 8
//! bits per block (32 values, or 256 for the K-quants, as ggml's Q8_0 / Q8_K), integer dot
//! products against the weight's own 4-8 bit values, f32 only for the scales. One code path
//! per instruction set, picked at run time ([`Isa::best`]): AVX-512 VNNI, AVX2, or portable
//! Rust.
//!
//! Each product decodes its weight 16 rows at a time (one rayon task) into the kernel's
//! layout (`unpack`: row after row, or the 16 rows side by side for the AVX-512 kernels of
//! Q4_K and the 32-value types), and multiplies every activation row with it while it sits in
//! the cache. Nothing stays decoded: the weight keeps its GGUF size in memory.
//!
//! Error against the exact product `x @ W.T` with the same quantized weight: the activation
//! rounding, at most half a quantization step per value, so
//! `|y - y_exact| <= sum over activation blocks of (max |x| / 127) / 2 * sum |w|` in that
//! block ([`activation_block`]), plus f32 accumulation (`tests/qgemm.rs` checks it for every
//! type and instruction set).

mod activations;
mod layout;
mod unpack;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

pub use activations::QActs;
use layout::LANE;
use unpack::{format, Format, Scales, WeightTile};

/// Which kernels run the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512Vnni,
}

/// Dot products of up to 4 weight rows x 4 activation rows.
type Tile = [[f32; 4]; 4];

/// Weight rows decoded at once by one task.
const ROWS_PER_TASK: usize = 16;

impl Isa {
    /// Every kernel this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx512Vnni);
            }
        }
        v
    }

    /// The fastest kernel this CPU runs, or a slower one named by `QWENCLIP_QGEMM_ISA`
    /// (`portable`, `avx2`, `avx512vnni`: to compare them, or to rule one out).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let avail = Isa::available();
            let top = *avail.last().expect("portable is always available");
            let forced = match std::env::var("QWENCLIP_QGEMM_ISA").as_deref() {
                Ok("portable") => Some(Isa::Portable),
                Ok("avx2") => Some(Isa::Avx2),
                Ok("avx512vnni") => Some(Isa::Avx512Vnni),
                _ => None,
            };
            forced.filter(|f| avail.contains(f)).unwrap_or(top)
        })
    }
}

/// The kernel for one type on one instruction set.
#[derive(Debug, Clone, Copy)]
struct Plan {
    isa: Isa,
    fmt: Format,
}

impl Plan {
    /// K-quants on SIMD sum in integers per block ([`Scales::Integer`]); the portable
    /// kernel and the other types scale every lane.
    fn integer_scales(self) -> bool {
        self.fmt.kquant && self.isa != Isa::Portable
    }

    /// Q4_K on AVX-512 VNNI: 16 rows side by side, integer sub-block scales.
    fn interleaved_q4k(self) -> bool {
        self.isa == Isa::Avx512Vnni && self.fmt.dtype == GgmlDType::Q4K
    }

    /// The 32-value block types on AVX-512 VNNI: 16 rows side by side, f32 block scales.
    fn interleaved32(self) -> bool {
        self.isa == Isa::Avx512Vnni && !self.fmt.kquant
    }

    fn scales(self) -> Scales {
        if self.interleaved_q4k() {
            Scales::Q4kInterleaved
        } else if self.interleaved32() {
            Scales::Interleaved32
        } else if self.integer_scales() {
            Scales::Integer
        } else {
            Scales::Lanes
        }
    }

    /// (weight rows, activation rows) of one micro-kernel call (registers: 32 zmm, 16 ymm).
    fn tile(self) -> (usize, usize) {
        match (self.isa, self.integer_scales()) {
            (Isa::Avx512Vnni, true) => (2, 4),
            (Isa::Avx2, true) => (2, 2),
            (Isa::Avx2, false) => (2, 4),
            _ => (4, 4),
        }
    }
}

/// Whether the integer kernels read `dtype` (the others run through candle's kernels).
pub fn supports(dtype: GgmlDType) -> bool {
    format(dtype).is_some()
}

/// Values per activation block for `dtype`: 256 for the K-quants (ggml's Q8_K), 32 for the
/// others (Q8_0). Each block has its own scale `max |x| / 127`.
pub fn activation_block(dtype: GgmlDType) -> usize {
    match format(dtype) {
        Some(f) if f.kquant => 256,
        _ => 32,
    }
}

/// `x @ W.T`: `w` the GGUF blocks of a `[m, k]` weight of type `dtype`, `x` `[n, k]` f32,
/// the result `[n, m]`. `None` for a type the kernels do not read (see [`supports`]).
/// Output does not depend on the thread count: each value is one task's, summed in a
/// fixed order.
pub fn matmul_t(
    w: &[u8],
    dtype: GgmlDType,
    (m, k): (usize, usize),
    x: &[f32],
    n: usize,
    isa: Isa,
) -> Option<Vec<f32>> {
    let fmt = format(dtype)?;
    assert!(k.is_multiple_of(fmt.block) && w.len() == m * k / fmt.block * fmt.bytes);
    assert_eq!(x.len(), n * k);
    let plan = Plan { isa, fmt };
    let (_, tn) = plan.tile();
    let acts = QActs::quantize(x, n, k, n.div_ceil(tn) * tn, activation_block(dtype));
    let mut y = vec![0f32; n * m];
    let out = SharedOut(y.as_mut_ptr());
    let row_bytes = k / fmt.block * fmt.bytes;
    w.par_chunks(ROWS_PER_TASK * row_bytes)
        .enumerate()
        .for_each(|(t, rows)| {
            thread_local! {
                static TILE: std::cell::RefCell<Option<WeightTile>> =
                    const { std::cell::RefCell::new(None) };
            }
            TILE.with_borrow_mut(|tile| {
                let tile = match tile {
                    Some(t) if t.k == k => t,
                    _ => tile.insert(WeightTile::new(ROWS_PER_TASK, k)),
                };
                let m0 = t * ROWS_PER_TASK;
                let rows = rows.len() / row_bytes;
                let src = &w[m0 * row_bytes..][..rows * row_bytes];
                tile.fill(&fmt, src, k, plan.scales());
                // SAFETY: each task writes only its own columns m0..m0 + rows of `y`.
                unsafe { product(tile, plan, &acts, (n, m), (m0, rows), &out) };
            })
        });
    Some(y)
}

struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements (their own columns).
unsafe impl Sync for SharedOut {}

/// The products of one decoded tile (weight rows `m0..m0 + rows`) with every activation row.
///
/// # Safety
/// `out` points to `n * m` floats and no other task writes columns `m0..m0 + rows`.
unsafe fn product(
    tile: &WeightTile,
    plan: Plan,
    acts: &QActs,
    (n, m): (usize, usize),
    (m0, rows): (usize, usize),
    out: &SharedOut,
) {
    let (tm, tn) = plan.tile();
    #[cfg(target_arch = "x86_64")]
    if plan.interleaved_q4k() || plan.interleaved32() {
        let mut res = [[0f32; unpack::INTERLEAVED_ROWS]; 4];
        for xr in (0..n).step_by(4) {
            if plan.interleaved_q4k() {
                x86::tile_avx512_vnni_q4k_lanes(&tile.lanes, acts, xr, &mut res);
            } else {
                x86::tile_avx512_vnni_lanes32(&tile.lanes, acts, xr, &mut res);
            }
            for (j, lanes) in res.iter().enumerate().take(n - xr) {
                for (i, &v) in lanes.iter().enumerate().take(rows) {
                    *out.0.add((xr + j) * m + m0 + i) = v;
                }
            }
        }
        return;
    }
    let mut res: Tile = [[0.0; 4]; 4];
    for xr in (0..n).step_by(tn) {
        for wr in (0..rows).step_by(tm) {
            run_tile(plan, tile, wr, acts, xr, &mut res);
            for (i, row) in res.iter().enumerate().take(tm.min(rows - wr)) {
                for (j, &v) in row.iter().enumerate().take(tn.min(n - xr)) {
                    *out.0.add((xr + j) * m + m0 + wr + i) = v;
                }
            }
        }
    }
}

fn run_tile(plan: Plan, w: &WeightTile, wr: usize, x: &QActs, xr: usize, out: &mut Tile) {
    let (signed, integer) = (plan.fmt.signed, plan.integer_scales());
    match plan.isa {
        // SAFETY: `Isa::available` detected the features; the tiles are padded to whole
        // micro-tiles (ROWS_PER_TASK rows, activation rows rounded up to the tile's), and
        // were filled with the scales `plan` asks for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if integer => unsafe { x86::tile_avx512_vnni_k(w, wr, x, xr, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if integer => unsafe { x86::tile_avx2_k(w, wr, x, xr, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if signed => unsafe { x86::tile_avx2::<true>(w, wr, x, xr, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::tile_avx2::<false>(w, wr, x, xr, out) },
        _ => tile_portable(signed, w, wr, x, xr, out),
    }
}

/// The kernels' arithmetic in plain Rust: integer sums per lane of 4, scaled in f32.
fn tile_portable(signed: bool, w: &WeightTile, wr: usize, x: &QActs, xr: usize, out: &mut Tile) {
    let (kp, gp) = (w.kp, w.gp);
    for (i, row) in out.iter_mut().enumerate() {
        let wq = &w.q[(wr + i) * kp..][..kp];
        let ws = &w.lane_scale[(wr + i) * kp / LANE..][..kp / LANE];
        let wm = &w.min[(wr + i) * gp..][..gp];
        for (j, o) in row.iter_mut().enumerate() {
            let xq = &x.q[(xr + j) * kp..][..kp];
            let xs = &x.lane_scale[(xr + j) * kp / LANE..][..kp / LANE];
            let xg = &x.group_sum[(xr + j) * gp..][..gp];
            let mut acc = 0f32;
            for l in 0..kp / LANE {
                let dot: i32 = (0..LANE)
                    .map(|e| {
                        let wv = wq[l * LANE + e];
                        let wv = if signed { wv as i8 as i32 } else { wv as i32 };
                        wv * xq[l * LANE + e] as i32
                    })
                    .sum();
                acc += dot as f32 * (ws[l] * xs[l]);
            }
            let mins: f32 = wm.iter().zip(xg).map(|(a, b)| a * b).sum();
            *o = acc - mins;
        }
    }
}
