//! 2-D convolution with a frozen kernel: the backward pass returns the input gradient only.
//!
//! candle's `conv2d` records both operands, so its backward also computes the kernel's
//! gradient (a full-size tensor per frozen convolution, and the most expensive of the two
//! products), and its CPU forward runs on candle's GEMM. Here, for f32 CPU tensors with a
//! system BLAS ([`super::blas`]), the forward is im2col + one BLAS product per column chunk,
//! written straight into `[B, C_out, H_out, W_out]`, and the backward is the transposed
//! product + col2im (1x1 stride-1 convolutions skip im2col: the input already is the column
//! matrix). Other dtypes and devices compute the forward with candle's `conv2d` and the input
//! gradient with `conv_transpose2d`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{self, Blas};
use super::{cpu_f32, f32_slice, Handover};

/// Columns of the im2col matrix built at a time: bounds its memory (`C_in k^2 x CHUNK`).
const COLUMN_CHUNK: usize = 4096;
/// Narrowest column block of one BLAS call when a product is split over the cores.
const MIN_COLUMNS: usize = 64;
/// Fewest rows of one BLAS call when a product is split by rows.
const MIN_ROWS: usize = 32;
/// Most blocks a product is split into.
const BLOCKS: usize = 8;

/// Square kernel, stride and zero padding of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

/// `conv2d(x, w) + b` for a frozen kernel `w` `[C_out, C_in, k, k]` and bias `b` `[C_out]`;
/// `x` `[B, C_in, H, W]`. When `x` is tracked the backward returns its gradient only.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    let (_, c_in, h, wd) = x.dims4()?;
    let (c_out, c_in_k, kh, kw) = w.dims4()?;
    if c_in != c_in_k || kh != kw {
        candle_core::bail!(
            "conv2d: input {:?} does not fit kernel {:?} (square kernels only)",
            x.dims(),
            w.dims()
        );
    }
    if h + 2 * p.padding < kh || wd + 2 * p.padding < kw {
        candle_core::bail!(
            "conv2d: input {:?} is smaller than the kernel {:?}",
            x.dims(),
            w.dims()
        );
    }
    if let Some(b) = b {
        if b.dims() != [c_out] {
            candle_core::bail!("conv2d: bias {:?} for {c_out} output channels", b.dims());
        }
    }
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if let Some(blas) = blas::get() {
        if f32_cpu(x) && f32_cpu(w) && b.is_none_or(f32_cpu) {
            return x.contiguous()?.apply_op1(BlasConv {
                blas,
                w: w.contiguous()?.detach(),
                b: b.map(|b| b.detach()),
                p,
            });
        }
    }
    let conv = |x: &Tensor| -> Result<Tensor> {
        let y = x.conv2d(w, p.padding, p.stride, 1, 1)?;
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
            None => Ok(y),
        }
    };
    if !x.track_op() {
        return conv(x);
    }
    let y = conv(&x.detach())?;
    x.apply_op1(FrozenConv {
        w: w.detach(),
        p,
        y: Handover::new(y),
    })
}

/// Output size of a convolution along one axis.
fn out_len(n: usize, k: usize, p: Conv2dParams) -> usize {
    (n + 2 * p.padding - k) / p.stride + 1
}

/// The result of candle's `conv2d`, handed over in `fwd`, with a backward through
/// `conv_transpose2d` (the input gradient only).
struct FrozenConv {
    w: Tensor,
    p: Conv2dParams,
    y: Handover,
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda(self.name())
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, k, _) = self.w.dims4()?;
        let (_, _, ho, wo) = grad.dims4()?;
        // conv_transpose2d gives (n_out - 1) s - 2p + k + output_padding rows: the input
        // rows a strided convolution's last window stops short of come from the output
        // padding. candle takes one for both axes: use the larger, then crop the other axis
        // (each position's value does not depend on how far the output extends).
        let reach = |n_out: usize| (n_out - 1) * self.p.stride + k - 2 * self.p.padding;
        let (pad_h, pad_w) = (h - reach(ho), w - reach(wo));
        let dx = grad
            .contiguous()?
            .conv_transpose2d(&self.w, self.p.padding, pad_h.max(pad_w), self.p.stride, 1)?
            .narrow(2, 0, h)?
            .narrow(3, 0, w)?;
        Ok(Some(dx))
    }
}

/// The f32 CPU convolution on the system BLAS.
struct BlasConv {
    blas: &'static Blas,
    w: Tensor,
    b: Option<Tensor>,
    p: Conv2dParams,
}

/// Sizes of one convolution.
#[derive(Clone, Copy)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    k: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    /// Rows of the column matrix.
    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    fn cols(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1 stride-1 convolution: the input is its own column matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output columns `ox0..ox1` of output row `oy` whose input pixel at kernel offset
    /// `(i, j)` lies inside the image: `(input row, first valid ox, end of valid ox)`, or
    /// `None` when the row itself is padding.
    #[inline(always)]
    fn valid(
        &self,
        oy: usize,
        (i, j): (usize, usize),
        (ox0, ox1): (usize, usize),
    ) -> Option<(usize, usize, usize)> {
        let y = (oy * self.stride + i).checked_sub(self.padding)?;
        if y >= self.h {
            return None;
        }
        // x = ox s + j - p in [0, w): ox >= ceil((p - j) / s), ox <= (w - 1 + p - j) / s.
        let lo = self.padding.saturating_sub(j).div_ceil(self.stride);
        let hi = (self.w - 1 + self.padding)
            .checked_sub(j)
            .map_or(0, |v| v / self.stride + 1);
        let a = lo.max(ox0).min(ox1);
        Some((y, a, hi.min(ox1).max(a)))
    }

    /// Calls `f(oy, ox0, ox1, offset)` for each output-row segment of columns `c0..c1`
    /// (`offset`: the segment's first column, relative to `c0`).
    #[inline(always)]
    fn segments(&self, (c0, c1): (usize, usize), mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut col = c0;
        while col < c1 {
            let (oy, ox0) = (col / self.wo, col % self.wo);
            let ox1 = self.wo.min(ox0 + (c1 - col));
            f(oy, ox0, ox1, col - c0);
            col += ox1 - ox0;
        }
    }

    /// Columns `c0..c1` of the im2col matrix of one image `x` `[C_in, H, W]`, row-major
    /// `[rows, c1 - c0]`.
    fn im2col(&self, x: &[f32], (c0, c1): (usize, usize), out: &mut [f32]) {
        let n = c1 - c0;
        let hw = self.h * self.w;
        let s = self.stride;
        out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let (c, ij) = (r / (self.k * self.k), r % (self.k * self.k));
            let (i, j) = (ij / self.k, ij % self.k);
            let plane = &x[c * hw..(c + 1) * hw];
            self.segments((c0, c1), |oy, ox0, ox1, off| {
                let dst = &mut row[off..off + ox1 - ox0];
                let Some((y, a, b)) = self.valid(oy, (i, j), (ox0, ox1)) else {
                    dst.fill(0.0);
                    return;
                };
                dst[..a - ox0].fill(0.0);
                dst[b - ox0..].fill(0.0);
                if a == b {
                    return;
                }
                let src = &plane[y * self.w..(y + 1) * self.w];
                let x0 = a * s + j - self.padding;
                if s == 1 {
                    dst[a - ox0..b - ox0].copy_from_slice(&src[x0..x0 + b - a]);
                } else {
                    for (d, x) in dst[a - ox0..b - ox0].iter_mut().zip((x0..).step_by(s)) {
                        *d = src[x];
                    }
                }
            });
        });
    }

    /// Adds columns `c0..c1` of a column-matrix gradient `[rows, c1 - c0]` into the image
    /// gradient `dx` `[C_in, H, W]` (col2im). One task per input channel: no two write the
    /// same element.
    fn col2im(&self, dcols: &[f32], (c0, c1): (usize, usize), dx: &mut [f32]) {
        let n = c1 - c0;
        let kk = self.k * self.k;
        let s = self.stride;
        dx.par_chunks_mut(self.h * self.w)
            .enumerate()
            .for_each(|(c, plane)| {
                for ij in 0..kk {
                    let (i, j) = (ij / self.k, ij % self.k);
                    let row = &dcols[(c * kk + ij) * n..(c * kk + ij + 1) * n];
                    self.segments((c0, c1), |oy, ox0, ox1, off| {
                        let Some((y, a, b)) = self.valid(oy, (i, j), (ox0, ox1)) else {
                            return;
                        };
                        if a == b {
                            return;
                        }
                        let src = &row[off + a - ox0..off + b - ox0];
                        let dst = &mut plane[y * self.w..(y + 1) * self.w];
                        let x0 = a * s + j - self.padding;
                        if s == 1 {
                            dst[x0..x0 + b - a]
                                .iter_mut()
                                .zip(src)
                                .for_each(|(d, &g)| *d += g);
                        } else {
                            for (&g, x) in src.iter().zip((x0..).step_by(s)) {
                                dst[x] += g;
                            }
                        }
                    });
                }
            });
    }
}

/// `c = op(a) @ op(b)` (`[m, n]`, leading dimension `ldc`) split over the rayon pool into
/// up to [`BLOCKS`] column or row blocks. Each block's call packs its part of one operand
/// and the whole of the other, so the split is along the larger of `m` and `n` (the smaller
/// operand is the one packed again). Blocks depend on the shape alone, so results do not
/// depend on the number of cores. Operands as in [`Blas::gemm`].
///
/// # Safety
/// As [`Blas::gemm`] (with beta = 0): the pointers cover the described matrices and `c` is
/// written by nobody else meanwhile.
unsafe fn par_gemm(
    blas: &Blas,
    (m, n, k): (usize, usize, usize),
    (a, lda, ta): (*const f32, usize, bool),
    (b, ldb, tb): (*const f32, usize, bool),
    (c, ldc): (*mut f32, usize),
) {
    let (a, b, c) = (a as usize, b as usize, c as usize);
    let run = |(r0, r1): (usize, usize), (j0, j1): (usize, usize)| {
        let a_off = if ta { r0 } else { r0 * lda };
        let b_off = if tb { j0 * ldb } else { j0 };
        // SAFETY: each task reads its blocks of a and b and writes its own block of c.
        unsafe {
            blas.gemm(
                (r1 - r0, j1 - j0, k),
                ((a as *const f32).add(a_off), lda, ta),
                ((b as *const f32).add(b_off), ldb, tb),
                0.0,
                ((c as *mut f32).add(r0 * ldc + j0), ldc),
            )
        }
    };
    let blocks = |len: usize, min: usize| -> Vec<(usize, usize)> {
        let per = len
            .div_ceil(BLOCKS)
            .max(min)
            .next_multiple_of(16)
            .min(len.max(1));
        (0..len)
            .step_by(per)
            .map(|s| (s, (s + per).min(len)))
            .collect()
    };
    let by_columns = if m <= n {
        n >= 2 * MIN_COLUMNS
    } else {
        m < 2 * MIN_ROWS
    };
    if by_columns {
        blocks(n, MIN_COLUMNS)
            .into_par_iter()
            .for_each(|cols| run((0, m), cols));
    } else {
        blocks(m, MIN_ROWS)
            .into_par_iter()
            .for_each(|rows| run(rows, (0, n)));
    }
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("conv2d")
}

impl BlasConv {
    fn geometry(&self, x: &Shape) -> Result<(usize, usize, Geometry)> {
        let (b, c_in, h, w) = x.dims4()?;
        let (c_out, _, k, _) = self.w.dims4()?;
        let g = Geometry {
            c_in,
            h,
            w,
            k,
            ho: out_len(h, k, self.p),
            wo: out_len(w, k, self.p),
            stride: self.p.stride,
            padding: self.p.padding,
        };
        Ok((b, c_out, g))
    }
}

impl CustomOp1 for BlasConv {
    fn name(&self) -> &'static str {
        "blas-frozen-conv2d"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx).ok_or_else(invalid)?;
        let (batch, c_out, g) = self.geometry(lx.shape())?;
        let (rows, cols) = (g.rows(), g.cols());
        let (ws, wl) = self.w.storage_and_layout();
        let w = cpu_f32(&ws, wl).ok_or_else(invalid)?;
        let mut y = vec![0f32; batch * c_out * cols];
        let chunk = COLUMN_CHUNK.max(MIN_COLUMNS).min(cols);
        let mut buf = if g.pointwise() {
            Vec::new()
        } else {
            vec![0f32; rows * chunk]
        };
        let in_len = g.c_in * g.h * g.w;
        for bi in 0..batch {
            let xi = &x[bi * in_len..(bi + 1) * in_len];
            let yi = &mut y[bi * c_out * cols..(bi + 1) * c_out * cols];
            for c0 in (0..cols).step_by(chunk) {
                let c1 = (c0 + chunk).min(cols);
                let (b_ptr, ldb) = if g.pointwise() {
                    (xi[c0..].as_ptr(), cols)
                } else {
                    let part = &mut buf[..rows * (c1 - c0)];
                    g.im2col(xi, (c0, c1), part);
                    (part.as_ptr(), c1 - c0)
                };
                // SAFETY: w is [c_out, rows]; the column block is [rows, c1 - c0] with
                // leading dimension ldb; y's block starts at column c0 of [c_out, cols].
                unsafe {
                    par_gemm(
                        self.blas,
                        (c_out, c1 - c0, rows),
                        (w.as_ptr(), rows, false),
                        (b_ptr, ldb, false),
                        (yi[c0..].as_mut_ptr(), cols),
                    );
                }
            }
        }
        if let Some(b) = &self.b {
            let (bs, bl) = b.storage_and_layout();
            let bias = cpu_f32(&bs, bl).ok_or_else(invalid)?;
            y.par_chunks_mut(cols.max(1))
                .enumerate()
                .for_each(|(r, row)| {
                    let v = bias[r % c_out];
                    row.iter_mut().for_each(|y| *y += v);
                });
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, c_out, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (batch, c_out, g) = self.geometry(x.shape())?;
        let (rows, cols) = (g.rows(), g.cols());
        let in_len = g.c_in * g.h * g.w;
        let mut dx = vec![0f32; batch * in_len];
        {
            let (ws, wl) = self.w.storage_and_layout();
            let w = cpu_f32(&ws, wl).ok_or_else(invalid)?;
            let (gs, gl) = grad.storage_and_layout();
            let gy = cpu_f32(&gs, gl).ok_or_else(invalid)?;
            let chunk = COLUMN_CHUNK.max(MIN_COLUMNS).min(cols);
            let mut buf = if g.pointwise() {
                Vec::new()
            } else {
                vec![0f32; rows * chunk]
            };
            for bi in 0..batch {
                let gi = &gy[bi * c_out * cols..(bi + 1) * c_out * cols];
                let dxi = &mut dx[bi * in_len..(bi + 1) * in_len];
                if g.pointwise() {
                    // dx = w.T @ dy: [c_in, c_out] x [c_out, cols].
                    // SAFETY: w is [c_out, c_in], dy [c_out, cols], dx [c_in, cols].
                    unsafe {
                        par_gemm(
                            self.blas,
                            (rows, cols, c_out),
                            (w.as_ptr(), rows, true),
                            (gi.as_ptr(), cols, false),
                            (dxi.as_mut_ptr(), cols),
                        );
                    }
                    continue;
                }
                for c0 in (0..cols).step_by(chunk) {
                    let c1 = (c0 + chunk).min(cols);
                    let part = &mut buf[..rows * (c1 - c0)];
                    // SAFETY: w is [c_out, rows] (read transposed), dy's block [c_out, c1 - c0]
                    // with leading dimension cols, the column gradient [rows, c1 - c0].
                    unsafe {
                        par_gemm(
                            self.blas,
                            (rows, c1 - c0, c_out),
                            (w.as_ptr(), rows, true),
                            (gi[c0..].as_ptr(), cols, false),
                            (part.as_mut_ptr(), c1 - c0),
                        );
                    }
                    g.col2im(part, (c0, c1), dxi);
                }
            }
        }
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}
