//! Weight rows decoded from their GGUF blocks into the kernels' layouts (`layout.rs`): 8-bit
//! values, their scales and a minimum per group, row after row ([`WeightTile`]) or 16 rows
//! side by side ([`Interleaved`]). Decoding a row is paid once per row and product, then
//! reused by every activation row.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::layout::{groups_padded, k_padded, GROUP, LANE};

/// How a type's bytes become `(q, scale, min)`.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    /// Values per block.
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// `q` is a signed byte (Q8_0); otherwise unsigned and below 64.
    pub signed: bool,
    /// A K-quant: 256-value blocks whose group scales are small integers times one f32
    /// scale, so products can be summed in integers over a whole block.
    pub kquant: bool,
    pub dtype: GgmlDType,
}

/// How a tile holds its rows: row after row with f32 scales per lane (any type) or with the
/// K-quants' integer group scales and f32 block scales; or 16 rows side by side
/// ([`Interleaved`]: Q4_K, or the 32-value block types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scales {
    Lanes,
    Integer,
    Q4kInterleaved,
    Interleaved32,
}

/// The destination of one block: `q`, and one scale and one minimum per group; K-quants
/// also give each group's integer scale and the block's f32 scale (`scale = block * int`).
pub struct Groups<'a> {
    pub q: &'a mut [u8],
    pub scale: &'a mut [f32],
    pub min: &'a mut [f32],
    pub int_scale: &'a mut [i16],
    pub block_scale: &'a mut f32,
}

/// The layout of a block type, `None` for the types the integer kernels do not read (Q2_K,
/// Q3_K: candle's kernels run them; F16/F32 are never quantized products).
pub fn format(dtype: GgmlDType) -> Option<Format> {
    let (block, bytes) = match dtype {
        GgmlDType::Q8_0 => (32, 34),
        GgmlDType::Q4_0 => (32, 18),
        GgmlDType::Q4_1 => (32, 20),
        GgmlDType::Q5_0 => (32, 22),
        GgmlDType::Q5_1 => (32, 24),
        GgmlDType::Q4K => (256, 144),
        GgmlDType::Q5K => (256, 176),
        GgmlDType::Q6K => (256, 210),
        _ => return None,
    };
    Some(Format {
        block,
        bytes,
        signed: dtype == GgmlDType::Q8_0,
        kquant: block == 256,
        dtype,
    })
}

/// Decoded rows, `[rows, kp]` values, `[rows, gp]` minimums, and the scales of [`Scales`]:
/// `[rows, kp / LANE]` f32 lane scales, or `[rows, kp / 2]` i16 scales (one per pair of
/// values, what `vpmaddwd` multiplies) and `[rows, kp / 256]` f32 block scales.
pub struct WeightTile {
    /// Values per row (before padding).
    pub k: usize,
    pub kp: usize,
    pub gp: usize,
    pub q: Vec<u8>,
    pub lane_scale: Vec<f32>,
    pub pair_scale: Vec<i16>,
    pub block_scale: Vec<f32>,
    /// [`Scales::Q4kInterleaved`], [`Scales::Interleaved32`]: the tile's 16 rows side by side.
    pub lanes: Interleaved,
    pub min: Vec<f32>,
    scale: Vec<f32>,
    int_scale: Vec<i16>,
}

impl WeightTile {
    pub fn new(rows: usize, k: usize) -> Self {
        let (kp, gp) = (k_padded(k), groups_padded(k));
        Self {
            k,
            kp,
            gp,
            q: vec![0; rows * kp],
            lane_scale: vec![0.0; rows * kp / LANE],
            pair_scale: vec![0; rows * kp / 2],
            block_scale: vec![0.0; rows * kp.div_ceil(256)],
            lanes: Interleaved::new(k),
            min: vec![0.0; rows * gp],
            scale: vec![0.0; k / GROUP],
            int_scale: vec![0; k / GROUP],
        }
    }

    /// Decodes `src` (whole rows of `fmt` blocks, `k` values each) into the first rows, in
    /// the layout of `scales`; rows past them are zeroed.
    pub fn fill(&mut self, fmt: &Format, src: &[u8], k: usize, scales: Scales) {
        if scales == Scales::Q4kInterleaved {
            return self.lanes.fill_q4k(src, k);
        }
        if scales == Scales::Interleaved32 {
            let (l, signed) = (&mut self.lanes, fmt.signed);
            return match fmt.dtype {
                GgmlDType::Q8_0 => l.fill_blocks32::<34>(src, k, signed, q8_0),
                GgmlDType::Q4_0 => l.fill_blocks32::<18>(src, k, signed, q4_0),
                GgmlDType::Q4_1 => l.fill_blocks32::<20>(src, k, signed, q4_1),
                GgmlDType::Q5_0 => l.fill_blocks32::<22>(src, k, signed, q5_0),
                GgmlDType::Q5_1 => l.fill_blocks32::<24>(src, k, signed, q5_1),
                _ => unreachable!("interleaved32 is for the 32-value block types"),
            };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected.
            return unsafe { self.fill_avx2(fmt, src, k, scales) };
        }
        self.fill_any(fmt, src, k, scales)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_avx2(&mut self, fmt: &Format, src: &[u8], k: usize, scales: Scales) {
        self.fill_any(fmt, src, k, scales)
    }

    /// Dispatches once per fill, so that each type's block loop has its decoder inlined and
    /// constant block sizes (a dispatch per 32-value block cost more than the decoding).
    #[inline(always)]
    fn fill_any(&mut self, fmt: &Format, src: &[u8], k: usize, scales: Scales) {
        debug_assert!(fmt.kquant || scales != Scales::Integer);
        match fmt.dtype {
            GgmlDType::Q8_0 => self.fill_rows::<32, 34>(fmt, src, k, scales, q8_0),
            GgmlDType::Q4_0 => self.fill_rows::<32, 18>(fmt, src, k, scales, q4_0),
            GgmlDType::Q4_1 => self.fill_rows::<32, 20>(fmt, src, k, scales, q4_1),
            GgmlDType::Q5_0 => self.fill_rows::<32, 22>(fmt, src, k, scales, q5_0),
            GgmlDType::Q5_1 => self.fill_rows::<32, 24>(fmt, src, k, scales, q5_1),
            GgmlDType::Q4K => self.fill_rows::<256, 144>(fmt, src, k, scales, q4_k),
            GgmlDType::Q5K => self.fill_rows::<256, 176>(fmt, src, k, scales, q5_k),
            GgmlDType::Q6K => self.fill_rows::<256, 210>(fmt, src, k, scales, q6_k),
            _ => unreachable!("`format` admits only the types above"),
        }
    }

    #[inline(always)]
    fn fill_rows<const BLOCK: usize, const BYTES: usize>(
        &mut self,
        fmt: &Format,
        src: &[u8],
        k: usize,
        scales: Scales,
        decode: fn(&[u8], &mut Groups),
    ) {
        let row_bytes = k / BLOCK * BYTES;
        let n = src.len() / row_bytes;
        let (kp, gp) = (self.kp, self.gp);
        for (r, row) in src.chunks_exact(row_bytes).enumerate() {
            let q = &mut self.q[r * kp..][..kp];
            let lanes = &mut self.lane_scale[r * kp / LANE..][..kp / LANE];
            let min = &mut self.min[r * gp..][..gp];
            let blocks = &mut self.block_scale[r * kp.div_ceil(256)..][..kp.div_ceil(256)];
            let mut unused = 0f32;
            for (b, bytes) in row.chunks_exact(BYTES).enumerate() {
                let (g0, g1) = (b * BLOCK / GROUP, (b + 1) * BLOCK / GROUP);
                decode(
                    bytes,
                    &mut Groups {
                        q: &mut q[b * BLOCK..][..BLOCK],
                        scale: &mut self.scale[g0..g1],
                        min: &mut min[g0..g1],
                        int_scale: &mut self.int_scale[g0..g1],
                        block_scale: if fmt.kquant {
                            &mut blocks[b]
                        } else {
                            &mut unused
                        },
                    },
                );
            }
            match scales {
                Scales::Lanes => {
                    for (lane, s) in lanes.chunks_exact_mut(GROUP / LANE).zip(&self.scale) {
                        lane.fill(*s);
                    }
                }
                Scales::Integer | Scales::Q4kInterleaved | Scales::Interleaved32 => {
                    let pairs = &mut self.pair_scale[r * kp / 2..][..kp / 2];
                    for (p, s) in pairs.chunks_exact_mut(GROUP / 2).zip(&self.int_scale) {
                        p.fill(*s);
                    }
                }
            }
        }
        self.q[n * kp..].fill(0);
        self.lane_scale[n * kp / LANE..].fill(0.0);
        self.pair_scale[n * kp / 2..].fill(0);
        self.block_scale[n * kp.div_ceil(256)..].fill(0.0);
        self.min[n * gp..].fill(0.0);
    }
}

#[inline(always)]
fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

#[inline(always)]
fn set_groups(g: &mut Groups, scale: f32, min: f32) {
    g.scale.fill(scale);
    g.min.fill(min);
}

#[inline(always)]
fn q8_0(b: &[u8], g: &mut Groups) {
    g.q.copy_from_slice(&b[2..34]);
    set_groups(g, half(b), 0.0);
}

/// The `2 * N` nibbles of `N` bytes: low halves first, as ggml stores them. Eight bytes at a
/// time in a `u64` (the byte loop did not vectorize, and was most of the decoding time).
#[inline(always)]
fn nibbles<const N: usize>(qs: &[u8], q: &mut [u8]) {
    const LOW: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    let (lo, hi) = q[..2 * N].split_at_mut(N);
    for ((src, l), h) in qs[..N]
        .chunks_exact(8)
        .zip(lo.chunks_exact_mut(8))
        .zip(hi.chunks_exact_mut(8))
    {
        let v = u64::from_le_bytes(src.try_into().expect("8 bytes"));
        l.copy_from_slice(&(v & LOW).to_le_bytes());
        h.copy_from_slice(&((v >> 4) & LOW).to_le_bytes());
    }
}

#[inline(always)]
fn q4_0(b: &[u8], g: &mut Groups) {
    let d = half(b);
    nibbles::<16>(&b[2..18], g.q);
    set_groups(g, d, 8.0 * d);
}

#[inline(always)]
fn q4_1(b: &[u8], g: &mut Groups) {
    nibbles::<16>(&b[4..20], g.q);
    set_groups(g, half(b), -half(&b[2..]));
}

/// The fifth bits of Q5_0/Q5_1: bit `j` of `qh` belongs to value `j`.
#[inline(always)]
fn fifth_bits(qh: &[u8], q: &mut [u8]) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) as u8) << 4;
    }
}

#[inline(always)]
fn q5_0(b: &[u8], g: &mut Groups) {
    let d = half(b);
    nibbles::<16>(&b[6..22], g.q);
    fifth_bits(&b[2..6], g.q);
    set_groups(g, d, 16.0 * d);
}

#[inline(always)]
fn q5_1(b: &[u8], g: &mut Groups) {
    nibbles::<16>(&b[8..24], g.q);
    fifth_bits(&b[4..8], g.q);
    set_groups(g, half(b), -half(&b[2..]));
}

/// The 8 six-bit scales and minimums of a Q4_K/Q5_K block (ggml's `get_scale_min_k4` for
/// j = 0..8), four bytes at a time: sub-blocks 0-3 keep the low 6 bits of bytes 0-3 (scales)
/// and 4-7 (minimums); sub-blocks 4-7 take 4 bits from bytes 8-11 and their top 2 bits from
/// the top of bytes 0-3 / 4-7.
#[inline(always)]
fn scales_mins_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let sc_hi = (c & 0x0f0f_0f0f) | ((a >> 2) & 0x3030_3030);
    let m_hi = ((c >> 4) & 0x0f0f_0f0f) | ((b >> 2) & 0x3030_3030);
    let join = |lo: u32, hi: u32| {
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&lo.to_le_bytes());
        v[4..].copy_from_slice(&hi.to_le_bytes());
        v
    };
    (join(a & 0x3f3f_3f3f, sc_hi), join(b & 0x3f3f_3f3f, m_hi))
}

/// Q4_K and Q5_K share the 8 sub-blocks of 32 with 6-bit scales and minimums.
#[inline(always)]
fn k4_scales(b: &[u8], g: &mut Groups) {
    let (d, dmin) = (half(b), half(&b[2..]));
    *g.block_scale = d;
    let (sc, m) = scales_mins_k4(b[4..16].try_into().expect("12 bytes"));
    for j in 0..8 {
        g.scale[2 * j..2 * j + 2].fill(d * sc[j] as f32);
        g.int_scale[2 * j..2 * j + 2].fill(sc[j] as i16);
        g.min[2 * j..2 * j + 2].fill(dmin * m[j] as f32);
    }
}

#[inline(always)]
fn q4_k(b: &[u8], g: &mut Groups) {
    for j in 0..4 {
        nibbles::<32>(&b[16 + 32 * j..], &mut g.q[64 * j..]);
    }
    k4_scales(b, g);
}

#[inline(always)]
fn q5_k(b: &[u8], g: &mut Groups) {
    let qh = &b[16..48];
    for j in 0..4 {
        let q: &mut [u8; 64] = (&mut g.q[64 * j..][..64]).try_into().expect("64 values");
        let qh: &[u8; 32] = qh.try_into().expect("32 bytes");
        nibbles::<32>(&b[48 + 32 * j..], q);
        for l in 0..32 {
            q[l] |= ((qh[l] >> (2 * j)) & 1) << 4;
            q[l + 32] |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
        }
    }
    k4_scales(b, g);
}

#[inline(always)]
fn q6_k(b: &[u8], g: &mut Groups) {
    let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], half(&b[208..]));
    for half_block in 0..2 {
        let ql: &[u8; 64] = ql[64 * half_block..][..64].try_into().expect("64 bytes");
        let qh: &[u8; 32] = qh[32 * half_block..][..32].try_into().expect("32 bytes");
        let q: &mut [u8; 128] = (&mut g.q[128 * half_block..][..128])
            .try_into()
            .expect("128 values");
        for l in 0..32 {
            q[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    *g.block_scale = d;
    for (i, &s) in sc.iter().enumerate() {
        g.int_scale[i] = s as i8 as i16;
        let s = d * (s as i8) as f32;
        g.scale[i] = s;
        g.min[i] = 32.0 * s;
    }
}

/// 16 Q4_K rows decoded side by side for the lane-per-row kernel: for every 4 values of a
/// row (a 32-bit lane of `vpdpbusd`), the 16 rows' 4 bytes are adjacent, so one 64-byte load
/// holds 4 values of each row and one broadcast activation word multiplies all 16. The sums
/// stay in lanes = output rows: no horizontal sum, and each row's sub-block scale is one
/// vector per 32 values (llama.cpp's repacked `q4_K_8x8` tile does the same).
pub struct Interleaved {
    /// Values per row.
    pub k: usize,
    /// `[k / 4][16]` words of 4 values.
    pub q: Vec<u32>,
    /// `[k / 32][16]`: the 6-bit sub-block scales.
    pub scale: Vec<i32>,
    /// `[k / 32][16]`: `dmin * m`, the sub-block minimums.
    pub min: Vec<f32>,
    /// `[k / 32][16]`: the f32 scales of the 32-value block types.
    pub block32: Vec<f32>,
    /// `[k / 256][16]`: the block scales `d`.
    pub d: Vec<f32>,
}

/// Rows side by side in an [`Interleaved`] tile.
pub const INTERLEAVED_ROWS: usize = 16;

impl Interleaved {
    fn new(k: usize) -> Self {
        let r = INTERLEAVED_ROWS;
        Self {
            k,
            q: vec![0; k / 4 * r],
            scale: vec![0; k / 32 * r],
            min: vec![0.0; k / 32 * r],
            block32: vec![0.0; k / 32 * r],
            d: vec![0.0; k / 256 * r],
        }
    }

    /// Decodes up to 16 rows of a 32-value block type (`BYTES` per block); missing rows become
    /// zeros. Signed bytes (Q8_0) are stored + 128, the minimum absorbing the shift (the VNNI
    /// kernels multiply unsigned by signed bytes).
    fn fill_blocks32<const BYTES: usize>(
        &mut self,
        src: &[u8],
        k: usize,
        signed: bool,
        decode: fn(&[u8], &mut Groups),
    ) {
        const R: usize = INTERLEAVED_ROWS;
        let row_bytes = k / 32 * BYTES;
        let n = src.len() / row_bytes;
        self.zero_rows_from(n, k);
        let (mut vals, mut scale, mut min, mut unused_i, mut unused_f) =
            ([0u8; 32], [0f32; 2], [0f32; 2], [0i16; 2], 0f32);
        for (r, row) in src.chunks_exact(row_bytes).enumerate() {
            for (b, block) in row.chunks_exact(BYTES).enumerate() {
                decode(
                    block,
                    &mut Groups {
                        q: &mut vals,
                        scale: &mut scale,
                        min: &mut min,
                        int_scale: &mut unused_i,
                        block_scale: &mut unused_f,
                    },
                );
                let shift = if signed { 0x8080_8080 } else { 0 };
                for (c, word) in vals.chunks_exact(4).enumerate() {
                    let word = u32::from_le_bytes(word.try_into().expect("4 bytes"));
                    self.q[(b * 8 + c) * R + r] = word ^ shift;
                }
                self.block32[b * R + r] = scale[0];
                self.min[b * R + r] = min[0] + if signed { 128.0 * scale[0] } else { 0.0 };
            }
        }
    }

    /// Zeros rows `n..16` (the padding rows of a task's last tile).
    fn zero_rows_from(&mut self, n: usize, k: usize) {
        const R: usize = INTERLEAVED_ROWS;
        for r in n..R {
            for c in 0..k / 4 {
                self.q[c * R + r] = 0;
            }
            for sb in 0..k / 32 {
                self.scale[sb * R + r] = 0;
                self.min[sb * R + r] = 0.0;
                self.block32[sb * R + r] = 0.0;
            }
            for b in 0..k / 256 {
                self.d[b * R + r] = 0.0;
            }
        }
    }

    /// Decodes up to 16 Q4_K rows (`src`, `k` values each); missing rows become zeros.
    fn fill_q4k(&mut self, src: &[u8], k: usize) {
        const R: usize = INTERLEAVED_ROWS;
        let nb = k / 256;
        let n = src.len() / (nb * 144);
        self.zero_rows_from(n, k);
        for (r, row) in src.chunks_exact(nb * 144).enumerate() {
            for (b, block) in row.chunks_exact(144).enumerate() {
                let (d, dmin) = (half(block), half(&block[2..]));
                self.d[b * R + r] = d;
                let (sc, m) = scales_mins_k4(block[4..16].try_into().expect("12 bytes"));
                for j in 0..8 {
                    self.scale[(b * 8 + j) * R + r] = sc[j] as i32;
                    self.min[(b * 8 + j) * R + r] = dmin * m[j] as f32;
                }
                // 8 bytes of chunk `j` hold values 64j + l..l+8 (low nibbles) and
                // 64j + 32 + l..l+8 (high): four words of 4 values, written in place.
                const LOW: u64 = 0x0f0f_0f0f_0f0f_0f0f;
                for (i, bytes) in block[16..144].chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
                    let (lo, hi) = (v & LOW, (v >> 4) & LOW);
                    let c = b * 64 + (i / 4) * 16 + (i % 4) * 2;
                    self.q[c * R + r] = lo as u32;
                    self.q[(c + 1) * R + r] = (lo >> 32) as u32;
                    self.q[(c + 8) * R + r] = hi as u32;
                    self.q[(c + 9) * R + r] = (hi >> 32) as u32;
                }
            }
        }
    }
}
