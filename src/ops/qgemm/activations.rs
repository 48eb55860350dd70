//! Activations quantized to 8 bits per block (ggml's schemes: 32 values as Q8_0 for the
//! 32-value weight types, 256 as Q8_K for the K-quants), laid out for the integer kernels:
//! values, the scale per block and per lane of 4 values (the kernels' lane width), and the
//! dequantized sum of every 16 values (for the weights' minimums).

use rayon::prelude::*;

use super::layout::{groups_padded, k_padded, GROUP, LANE};

/// `rows` activation rows quantized per block (each block's scale is `max |x| / 127`); rows
/// beyond the input's are zero.
pub struct QActs {
    /// Values per block: 32 or 256.
    pub block: usize,
    /// Padded row length (see [`k_padded`]).
    pub kp: usize,
    /// Padded group count per row (see [`groups_padded`]).
    pub gp: usize,
    /// `[rows, kp]`, in -127..=127.
    pub q: Vec<i8>,
    /// `[rows, kp / LANE]`: the scale of the block each lane of 4 values belongs to.
    pub lane_scale: Vec<f32>,
    /// `[rows, kp / block]`: the scale of each block.
    pub block_scale: Vec<f32>,
    /// `[rows, gp]`: scale * sum of the 16 quantized values of each group.
    pub group_sum: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (`[n, k]`, `k` a multiple of `block`) into `rows >= n` rows.
    pub fn quantize(x: &[f32], n: usize, k: usize, rows: usize, block: usize) -> Self {
        assert!(matches!(block, 32 | 256) && k.is_multiple_of(block));
        assert!(x.len() == n * k && rows >= n);
        let (kp, gp) = (k_padded(k), groups_padded(k));
        let mut q = vec![0i8; rows * kp];
        let mut lane_scale = vec![0f32; rows * kp / LANE];
        let mut block_scale = vec![0f32; rows * kp.div_ceil(block)];
        let mut group_sum = vec![0f32; rows * gp];
        q.par_chunks_mut(kp)
            .zip(lane_scale.par_chunks_mut(kp / LANE))
            .zip(block_scale.par_chunks_mut(kp.div_ceil(block)))
            .zip(group_sum.par_chunks_mut(gp))
            .take(n)
            .enumerate()
            .for_each(|(r, (((q, lanes), blocks), sums))| {
                let row = Row {
                    q,
                    lanes,
                    blocks,
                    sums,
                };
                quantize_row(&x[r * k..][..k], block, row)
            });
        Self {
            block,
            block_scale,
            kp,
            gp,
            q,
            lane_scale,
            group_sum,
        }
    }

    /// Row `r` as the kernels read it back: `q * scale` for the first `k` values.
    pub fn dequantized_row(&self, r: usize, k: usize) -> Vec<f32> {
        (0..k)
            .map(|i| self.q[r * self.kp + i] as f32 * self.lane_scale[(r * self.kp + i) / LANE])
            .collect()
    }
}

/// One row's destinations (padding included).
struct Row<'a> {
    q: &'a mut [i8],
    lanes: &'a mut [f32],
    blocks: &'a mut [f32],
    sums: &'a mut [f32],
}

fn quantize_row(x: &[f32], block: usize, row: Row) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected.
        return unsafe { quantize_row_avx2(x, block, row) };
    }
    quantize_row_any(x, block, row)
}

/// [`quantize_row_any`] compiled for AVX2: the loops vectorize 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], block: usize, row: Row) {
    quantize_row_any(x, block, row)
}

#[inline(always)]
fn quantize_row_any(x: &[f32], block: usize, row: Row) {
    for (b, xb) in x.chunks_exact(block).enumerate() {
        // The largest |x| compared as bits (the order of non-negative floats), where NaN and
        // infinity are larger than every finite value: then the scale is NaN, and so is the
        // output.
        let bits = xb
            .iter()
            .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
        let amax = if bits < 0x7f80_0000 {
            f32::from_bits(bits)
        } else {
            f32::NAN
        };
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let qb = &mut row.q[b * block..][..block];
        for (qv, &v) in qb.iter_mut().zip(xb) {
            // Round to nearest even by adding and removing 1.5 * 2^23 (|v * id| <= 127): one
            // vector add and subtract instead of a call to `roundf` per value.
            const MAGIC: f32 = 12_582_912.0;
            *qv = ((v * id + MAGIC) - MAGIC) as i8;
        }
        row.blocks[b] = d;
        row.lanes[b * block / LANE..][..block / LANE].fill(d);
        for (g, qg) in qb.chunks_exact(GROUP).enumerate() {
            let s: i32 = qg.iter().map(|&v| v as i32).sum();
            row.sums[b * block / GROUP + g] = d * s as f32;
        }
    }
}
