//! The x86 micro-kernels: a tile of weight rows x activation rows of dot products of 8-bit
//! values, scaled and accumulated in f32, then the groups' minimums subtracted. AVX-512 VNNI
//! (`vpdpbusd`: 64 byte products into 16 lanes per instruction; `vpdpwssd`) and AVX2
//! (`vpmaddubsw` + `vpmaddwd`: 32 into 8), as ggml does them.

use std::arch::x86_64::*;

use super::activations::QActs;
use super::layout::{GROUP_STEP, K_STEP, LANE};
use super::unpack::{Interleaved, WeightTile, INTERLEAVED_ROWS};
use super::Tile;

/// 2 weight rows x 4 activation rows. `SIGNED`: the weight bytes are signed (Q8_0), so the
/// products go through `|w| * sign(x, w)` (`vpmaddubsw` multiplies unsigned by signed and
/// would saturate on `w + 128`); unsigned weights are below 64 and never saturate.
///
/// # Safety
/// The CPU has AVX2 and FMA; `wr + 2` and `xr + 4` are within the tiles' rows.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2<const SIGNED: bool>(
    w: &WeightTile,
    wr: usize,
    x: &QActs,
    xr: usize,
    out: &mut Tile,
) {
    let kp = w.kp;
    let wq: [*const u8; 2] = std::array::from_fn(|i| w.q.as_ptr().add((wr + i) * kp));
    let ws: [*const f32; 2] =
        std::array::from_fn(|i| w.lane_scale.as_ptr().add((wr + i) * kp / LANE));
    let xq: [*const i8; 4] = std::array::from_fn(|j| x.q.as_ptr().add((xr + j) * kp));
    let xs: [*const f32; 4] =
        std::array::from_fn(|j| x.lane_scale.as_ptr().add((xr + j) * kp / LANE));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut p = 0;
    while p < kp {
        let wv: [__m256i; 2] = std::array::from_fn(|i| _mm256_loadu_si256(wq[i].add(p).cast()));
        let wa: [__m256i; 2] = if SIGNED {
            std::array::from_fn(|i| _mm256_abs_epi8(wv[i]))
        } else {
            wv
        };
        let wsv: [__m256; 2] = std::array::from_fn(|i| _mm256_loadu_ps(ws[i].add(p / LANE)));
        for j in 0..4 {
            let xv = _mm256_loadu_si256(xq[j].add(p).cast());
            let xsv = _mm256_loadu_ps(xs[j].add(p / LANE));
            for i in 0..2 {
                let xx = if SIGNED {
                    _mm256_sign_epi8(xv, wv[i])
                } else {
                    xv
                };
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[i], xx), ones);
                let dot = _mm256_cvtepi32_ps(dot);
                acc[i][j] = _mm256_fmadd_ps(dot, _mm256_mul_ps(wsv[i], xsv), acc[i][j]);
            }
        }
        p += 32;
    }
    finish_256(acc, w, wr, x, xr, out);
}

/// Subtracts the weight groups' minimums times the activation groups' sums (lane order does
/// not matter: every lane is summed) and sums each accumulator into `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn finish_512<const RM: usize, const RN: usize>(
    mut acc: [[__m512; RN]; RM],
    w: &WeightTile,
    wr: usize,
    x: &QActs,
    xr: usize,
    out: &mut Tile,
) {
    let gp = w.gp;
    for g in (0..gp).step_by(GROUP_STEP) {
        let sv: [__m512; RN] =
            std::array::from_fn(|j| _mm512_loadu_ps(x.group_sum.as_ptr().add((xr + j) * gp + g)));
        for (i, row) in acc.iter_mut().enumerate() {
            let mv = _mm512_loadu_ps(w.min.as_ptr().add((wr + i) * gp + g));
            for (a, s) in row.iter_mut().zip(&sv) {
                *a = _mm512_fnmadd_ps(mv, *s, *a);
            }
        }
    }
    for i in 0..RM {
        for j in 0..RN {
            out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
        }
    }
}

/// [`finish_512`] for the AVX2 kernels.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn finish_256<const RM: usize, const RN: usize>(
    mut acc: [[__m256; RN]; RM],
    w: &WeightTile,
    wr: usize,
    x: &QActs,
    xr: usize,
    out: &mut Tile,
) {
    let gp = w.gp;
    for g in (0..gp).step_by(8) {
        let sv: [__m256; RN] =
            std::array::from_fn(|j| _mm256_loadu_ps(x.group_sum.as_ptr().add((xr + j) * gp + g)));
        for (i, row) in acc.iter_mut().enumerate() {
            let mv = _mm256_loadu_ps(w.min.as_ptr().add((wr + i) * gp + g));
            for (a, s) in row.iter_mut().zip(&sv) {
                *a = _mm256_fnmadd_ps(mv, *s, *a);
            }
        }
    }
    for i in 0..RM {
        for j in 0..RN {
            out[i][j] = hsum256(acc[i][j]);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The K-quant kernels: products summed in integers over each 256-value block (`vpmaddubsw`
/// then the group's integer scale through `vpdpwssd` / `vpmaddwd`), converted to f32 once per
/// block. Half the vector instructions of the lane-scaled kernels above, as ggml's
/// `q4_K x q8_K` does. Unsigned weights below 64 times activations in -127..=127 never
/// saturate `vpmaddubsw`; a block's sum stays below 2^25.
///
/// 2 weight rows x 4 activation rows.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; the tile holds integer scales and the activations
/// are quantized per 256 values; `wr + 2` and `xr + 4` are within the tiles' rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn tile_avx512_vnni_k(w: &WeightTile, wr: usize, x: &QActs, xr: usize, out: &mut Tile) {
    let (kp, nb) = (w.kp, w.kp / 256);
    let wq: [*const u8; 2] = std::array::from_fn(|i| w.q.as_ptr().add((wr + i) * kp));
    let wp: [*const i16; 2] = std::array::from_fn(|i| w.pair_scale.as_ptr().add((wr + i) * kp / 2));
    let wb: [*const f32; 2] = std::array::from_fn(|i| w.block_scale.as_ptr().add((wr + i) * nb));
    let xq: [*const i8; 4] = std::array::from_fn(|j| x.q.as_ptr().add((xr + j) * kp));
    let xb: [*const f32; 4] = std::array::from_fn(|j| x.block_scale.as_ptr().add((xr + j) * nb));
    let mut acc = [[_mm512_setzero_ps(); 4]; 2];
    for b in 0..nb {
        let mut sums = [[_mm512_setzero_si512(); 4]; 2];
        for step in 0..256 / K_STEP {
            let p = b * 256 + step * K_STEP;
            let wv: [__m512i; 2] = std::array::from_fn(|i| _mm512_loadu_si512(wq[i].add(p).cast()));
            let sc: [__m512i; 2] =
                std::array::from_fn(|i| _mm512_loadu_si512(wp[i].add(p / 2).cast()));
            for j in 0..4 {
                let xv = _mm512_loadu_si512(xq[j].add(p).cast());
                for i in 0..2 {
                    let pairs = _mm512_maddubs_epi16(wv[i], xv);
                    sums[i][j] = _mm512_dpwssd_epi32(sums[i][j], pairs, sc[i]);
                }
            }
        }
        // All in vectors (a scalar product per pair made a dependency chain per block).
        let dw: [__m512; 2] = std::array::from_fn(|i| _mm512_set1_ps(*wb[i].add(b)));
        let dx: [__m512; 4] = std::array::from_fn(|j| _mm512_set1_ps(*xb[j].add(b)));
        for i in 0..2 {
            for j in 0..4 {
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[i][j]), dw[i]);
                acc[i][j] = _mm512_fmadd_ps(scaled, dx[j], acc[i][j]);
            }
        }
    }
    finish_512(acc, w, wr, x, xr, out);
}

/// [`tile_avx512_vnni_k`] with AVX2: 2 weight rows x 2 activation rows.
///
/// # Safety
/// The CPU has AVX2 and FMA; as [`tile_avx512_vnni_k`] otherwise.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2_k(w: &WeightTile, wr: usize, x: &QActs, xr: usize, out: &mut Tile) {
    let (kp, nb) = (w.kp, w.kp / 256);
    let wq: [*const u8; 2] = std::array::from_fn(|i| w.q.as_ptr().add((wr + i) * kp));
    let wp: [*const i16; 2] = std::array::from_fn(|i| w.pair_scale.as_ptr().add((wr + i) * kp / 2));
    let wb: [*const f32; 2] = std::array::from_fn(|i| w.block_scale.as_ptr().add((wr + i) * nb));
    let xq: [*const i8; 2] = std::array::from_fn(|j| x.q.as_ptr().add((xr + j) * kp));
    let xb: [*const f32; 2] = std::array::from_fn(|j| x.block_scale.as_ptr().add((xr + j) * nb));
    let mut acc = [[_mm256_setzero_ps(); 2]; 2];
    for b in 0..nb {
        let mut sums = [[_mm256_setzero_si256(); 2]; 2];
        for step in 0..256 / 32 {
            let p = b * 256 + step * 32;
            let wv: [__m256i; 2] = std::array::from_fn(|i| _mm256_loadu_si256(wq[i].add(p).cast()));
            let sc: [__m256i; 2] =
                std::array::from_fn(|i| _mm256_loadu_si256(wp[i].add(p / 2).cast()));
            for j in 0..2 {
                let xv = _mm256_loadu_si256(xq[j].add(p).cast());
                for i in 0..2 {
                    let pairs = _mm256_maddubs_epi16(wv[i], xv);
                    sums[i][j] = _mm256_add_epi32(sums[i][j], _mm256_madd_epi16(pairs, sc[i]));
                }
            }
        }
        let dw: [__m256; 2] = std::array::from_fn(|i| _mm256_set1_ps(*wb[i].add(b)));
        let dx: [__m256; 2] = std::array::from_fn(|j| _mm256_set1_ps(*xb[j].add(b)));
        for i in 0..2 {
            for j in 0..2 {
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[i][j]), dw[i]);
                acc[i][j] = _mm256_fmadd_ps(scaled, dx[j], acc[i][j]);
            }
        }
    }
    finish_256(acc, w, wr, x, xr, out);
}

/// Q4_K, 16 weight rows (one per lane, [`Interleaved`]) x 4 activation rows: per sub-block of
/// 32 values, 8 `vpdpbusd` per activation row (each 4 values x 16 rows), then the rows'
/// integer scales (`vpmulld`) into an integer block sum; f32 once per 256-value block.
/// `out[j]` receives the 16 rows' products with activation row `xr + j`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; the activations are quantized per 256 values and
/// `xr + 4` is within their rows; `w` holds `x.kp` values per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn tile_avx512_vnni_q4k_lanes(
    w: &Interleaved,
    x: &QActs,
    xr: usize,
    out: &mut [[f32; INTERLEAVED_ROWS]; 4],
) {
    const R: usize = INTERLEAVED_ROWS;
    let (kp, gp, nb) = (x.kp, x.gp, x.kp / 256);
    let xq: [*const i8; 4] = std::array::from_fn(|j| x.q.as_ptr().add((xr + j) * kp));
    let xs: [*const f32; 4] = std::array::from_fn(|j| x.group_sum.as_ptr().add((xr + j) * gp));
    let xb: [*const f32; 4] = std::array::from_fn(|j| x.block_scale.as_ptr().add((xr + j) * nb));
    let mut acc = [_mm512_setzero_ps(); 4];
    for b in 0..nb {
        let mut block = [_mm512_setzero_si512(); 4];
        for sb in b * 8..b * 8 + 8 {
            let mut dots = [_mm512_setzero_si512(); 4];
            for c in sb * 8..sb * 8 + 8 {
                let wv = _mm512_loadu_si512(w.q.as_ptr().add(c * R).cast());
                for j in 0..4 {
                    let xv = _mm512_set1_epi32(xq[j].add(c * 4).cast::<i32>().read_unaligned());
                    dots[j] = _mm512_dpbusd_epi32(dots[j], wv, xv);
                }
            }
            let sc = _mm512_loadu_si512(w.scale.as_ptr().add(sb * R).cast());
            let mn = _mm512_loadu_ps(w.min.as_ptr().add(sb * R));
            for j in 0..4 {
                block[j] = _mm512_add_epi32(block[j], _mm512_mullo_epi32(dots[j], sc));
                let sum = _mm512_set1_ps(*xs[j].add(2 * sb) + *xs[j].add(2 * sb + 1));
                acc[j] = _mm512_fnmadd_ps(mn, sum, acc[j]);
            }
        }
        let d = _mm512_loadu_ps(w.d.as_ptr().add(b * R));
        for j in 0..4 {
            let s = _mm512_mul_ps(d, _mm512_set1_ps(*xb[j].add(b)));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block[j]), s, acc[j]);
        }
    }
    for j in 0..4 {
        _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
    }
}

/// [`tile_avx512_vnni_q4k_lanes`] for the 32-value block types (Q4_0 ... Q8_0, bytes stored
/// unsigned): per block, 8 `vpdpbusd` per activation row, then the rows' f32 scales times
/// the activation block's; activations quantized per 32 values.
///
/// # Safety
/// As [`tile_avx512_vnni_q4k_lanes`], with activations quantized per 32 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn tile_avx512_vnni_lanes32(
    w: &Interleaved,
    x: &QActs,
    xr: usize,
    out: &mut [[f32; INTERLEAVED_ROWS]; 4],
) {
    const R: usize = INTERLEAVED_ROWS;
    let (kp, gp, nb) = (x.kp, x.gp, w.k / 32);
    let xq: [*const i8; 4] = std::array::from_fn(|j| x.q.as_ptr().add((xr + j) * kp));
    let xs: [*const f32; 4] = std::array::from_fn(|j| x.group_sum.as_ptr().add((xr + j) * gp));
    let xb: [*const f32; 4] =
        std::array::from_fn(|j| x.block_scale.as_ptr().add((xr + j) * kp / 32));
    let mut acc = [_mm512_setzero_ps(); 4];
    for b in 0..nb {
        let mut dots = [_mm512_setzero_si512(); 4];
        for c in b * 8..b * 8 + 8 {
            let wv = _mm512_loadu_si512(w.q.as_ptr().add(c * R).cast());
            for j in 0..4 {
                let xv = _mm512_set1_epi32(xq[j].add(c * 4).cast::<i32>().read_unaligned());
                dots[j] = _mm512_dpbusd_epi32(dots[j], wv, xv);
            }
        }
        let sc = _mm512_loadu_ps(w.block32.as_ptr().add(b * R));
        let mn = _mm512_loadu_ps(w.min.as_ptr().add(b * R));
        for j in 0..4 {
            let s = _mm512_mul_ps(sc, _mm512_set1_ps(*xb[j].add(b)));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[j]), s, acc[j]);
            let sum = _mm512_set1_ps(*xs[j].add(2 * b) + *xs[j].add(2 * b + 1));
            acc[j] = _mm512_fnmadd_ps(mn, sum, acc[j]);
        }
    }
    for j in 0..4 {
        _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
    }
}
