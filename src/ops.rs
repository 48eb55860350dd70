//! The ops whose fast candle kernels record no gradient (see `shared/notes/candle.md`), and
//! the CPU kernels that replace candle's composed autograd on the training path. Every model
//! calls these with a [`Path`]: `Fast` for inference, `Differentiable` for training.
//! `tests/gradients.rs` checks the composed differentiable versions against finite
//! differences, `tests/kernels.rs` the fused f32 CPU ops (forward, backward, which operands
//! get gradients) against those in f64, and `tests/parity.rs` checks both paths agree.
//!
//! On the CPU with a system BLAS ([`blas`]) each training op is a single autograd node with
//! its own backward: candle's backward pays a zero-filled buffer and an add for every
//! gradient of every node, and computes gradients for frozen operands too, which made the
//! composed graph twice as slow as `transformers` + `peft` on a 2-core CPU.

mod attention;
pub mod blas;
mod gelu;
mod layer_norm;
mod linear;
mod rms_norm;
mod rope;
mod swiglu;
pub mod vexp;

pub use attention::attention;
pub use gelu::gelu_erf;
pub use swiglu::silu_mul;

use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, D,
};

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no autograd graph worth keeping.
    Fast,
    /// Only ops with a backward; frozen weights get no gradient.
    Differentiable,
}

/// A large negative bias for masked attention logits. Finite so that a fully masked row (the
/// padding rows of an empty prompt) gives a uniform softmax instead of NaN.
pub const MASKED: f64 = -1e9;

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Path::Differentiable if x.track_op() && rms_norm::applies(x, weight) => {
            rms_norm::forward(x, weight, eps)
        }
        Path::Differentiable => {
            let dtype = x.dtype();
            let x = x.to_dtype(compute_dtype(dtype))?;
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
            normed.to_dtype(dtype)?.broadcast_mul(weight)
        }
    }
}

pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    path: Path,
) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32),
        Path::Differentiable if layer_norm::applies(x, weight, bias) => {
            layer_norm::forward(x, weight, bias, eps)
        }
        Path::Differentiable => candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32),
    }
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Path::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// The error of a CPU kernel given an operand that is not contiguous f32 on the CPU (its
/// callers check first, so this means a bug, named by the op).
pub(crate) fn not_cpu_f32(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: operands must be contiguous f32 on the CPU"))
}

/// The f32 elements of a contiguous CPU tensor's storage, or `None` (another device, dtype
/// or a strided layout). For the CPU kernels that work on slices.
pub(crate) fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l),
        _ => None,
    }
}

/// [`cpu_f32`] for a CPU storage (what in-place ops receive).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

/// [`f32_slice`], mutable.
pub(crate) fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Option<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Some(&mut v[a..b]),
        _ => None,
    }
}

/// Rotary embedding, non-interleaved halves (`rotate_half`, as in Hugging Face Qwen3).
/// `x`: `[B, H, T, D]`; `cos`, `sin`: `[T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        Path::Differentiable => candle_nn::rotary_emb::rope_slow(x, cos, sin),
    }
}

/// [`rope`] of `x` `[B, T, H, D]` (the projections' layout) returned as `[B, H, T, D]`
/// contiguous (attention's layout). f32 CPU tensors take one fused pass (transpose and
/// rotation, with its own backward); others the transposed copy and [`rope`].
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    if rope::applies(x, cos, sin) {
        return rope::to_heads(x, cos, sin);
    }
    rope(&x.transpose(1, 2)?, cos, sin, path)?.contiguous()
}

/// `x @ w.T` for `x` of any rank (`[..., in]`) as one 2-D GEMM over the `[out, in]` weight
/// view (the layout candle's GEMM is fastest on). Tracked f32 CPU operands take the BLAS op
/// with its own backward ([`linear`]).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op();
    if tracked && linear::applies(x, &[w]) && x.dims().last() == w.dims().last() {
        return linear::trainable(x, w);
    }
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let x = x.reshape((rows, inner))?;
    let blas = if tracked {
        None
    } else {
        blas_matmul(&x, w, true)?
    };
    let y = match blas {
        Some(y) => y,
        None => x.matmul(&w.t()?)?,
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

/// `x @ w.T + b` (a resampler projection). Tracked f32 CPU operands take one BLAS op with
/// its own backward for all three ([`linear`]); others [`matmul_t`] and a broadcast add.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = b else {
        return matmul_t(x, w);
    };
    let tracked = [x, w, b].iter().any(|t| t.track_op());
    let fits = x.dims().last() == w.dims().last() && b.dims() == &w.dims()[..1];
    if tracked && fits && b.dtype() == DType::F32 && b.device().is_cpu() && linear::applies(x, &[w])
    {
        return linear::trainable_with_bias(x, w, b);
    }
    matmul_t(x, w)?.broadcast_add(b)
}

/// Batched `a @ b.T` (`b_transposed`) or `a @ b` over the leading dimensions: attention's
/// products. On the system BLAS for untracked f32 CPU tensors, else candle's matmul.
pub fn batched_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        if let Some(y) = blas_matmul(a, b, b_transposed)? {
            return Ok(y);
        }
    }
    if b_transposed {
        a.matmul(&b.t()?)
    } else {
        a.matmul(b)
    }
}

/// `a @ b.T` (`b_transposed`) or `a @ b` for f32 CPU tensors of equal rank >= 2 and equal
/// leading (batch) dimensions, on the system BLAS when there is one ([`blas`]); `None` where
/// that does not apply (candle's GEMM then). The result records no autograd op: callers use
/// it only where no gradient flows through the product.
fn blas_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Option<Tensor>> {
    let Some(blas) = blas::get() else {
        return Ok(None);
    };
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || !a.device().is_cpu() {
        return Ok(None);
    }
    let (da, db) = (a.dims(), b.dims());
    let r = da.len();
    if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] {
        return Ok(None); // broadcasting, or candle reports the shape error
    }
    let batch: usize = da[..r - 2].iter().product();
    let (m, k) = (da[r - 2], da[r - 1]);
    let (n, kb) = if b_transposed {
        (db[r - 2], db[r - 1])
    } else {
        (db[r - 1], db[r - 2])
    };
    if k != kb || !blas.fits((m, n, k)) {
        return Ok(None);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let out = {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        let (Some(va), Some(vb)) = (cpu_f32(&sa, la), cpu_f32(&sb, lb)) else {
            return Ok(None);
        };
        blas.product(batch, (m, n, k), (va, false), (vb, b_transposed))
    };
    let mut shape = da.to_vec();
    shape[r - 1] = n;
    Tensor::from_vec(out, shape, a.device()).map(Some)
}

/// `x @ w.T` where `w` is frozen: the backward pass returns the input gradient only.
/// Plain `matmul` would also compute a full-size gradient for every frozen base weight
/// (8x the gradient memory on a Qwen3-4B layer).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return matmul_t(x, w);
    }
    if linear::applies(x, &[w]) && x.dims().last() == w.dims().last() {
        return linear::frozen(x, w);
    }
    let y = matmul_t(&x.detach(), w)?.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: Frozen::Dense(w.detach()),
        y: Arc::new(Mutex::new(Some(y))),
    })
}

/// `x @ w.T + scale (x @ a.T) @ b.T` for a frozen `w` and trainable LoRA factors `a`
/// `[r, in]`, `b` `[out, r]`, as one BLAS op with its own backward ([`linear`]); `None` where
/// that does not apply (f32 CPU tensors and a system BLAS), for the caller to compose.
pub fn frozen_linear_lora(
    x: &Tensor,
    w: &Tensor,
    (a, b, scale): (&Tensor, &Tensor, f64),
) -> Result<Option<Tensor>> {
    let inp = x.dims().last().copied();
    let fits = w.dims().last().copied() == inp
        && a.dims().last().copied() == inp
        && b.dims().first() == w.dims().first()
        && b.dims().last() == a.dims().first();
    if !fits || !linear::applies(x, &[w, a, b]) {
        return Ok(None);
    }
    linear::frozen_with_lora(x, w, a, b, scale).map(Some)
}

/// `x @ w.T` for a quantized frozen weight (GGUF). On [`Path::Differentiable`] the backward
/// pass returns the input gradient `grad @ W`, dequantizing `W` on the fly for that one
/// product: the dequantized copy is dropped right after and never kept by the graph.
pub fn quantized_linear(x: &Tensor, w: &Arc<QMatrix>, path: Path) -> Result<Tensor> {
    if path == Path::Fast || !x.track_op() {
        return w.forward(x);
    }
    let y = w.forward(&x.detach())?.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: Frozen::Quantized(w.clone()),
        y: Arc::new(Mutex::new(Some(y))),
    })
}

/// The frozen weight a [`FrozenLinear`] multiplies the gradient with.
enum Frozen {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

/// The product is computed eagerly with ordinary ops and handed over in `fwd`; only the
/// backward rule is custom. The result is taken out of the op on first use so it is not held
/// twice by the graph.
struct FrozenLinear {
    w: Frozen,
    y: Arc<Mutex<Option<Tensor>>>,
}

impl FrozenLinear {
    fn take(&self) -> Result<Tensor> {
        self.y
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-linear result lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear forward ran twice".into()))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) if layout.start_offset() == 0 => {
                Ok((s.clone(), y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: unexpected storage layout"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) if layout.start_offset() == 0 => {
                Ok((s.try_clone(layout)?, y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: unexpected storage layout"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad.dims();
        let out = dims[dims.len() - 1];
        let rows = grad.elem_count() / out.max(1);
        let g = grad.reshape((rows, out))?;
        let (g, inp) = match &self.w {
            Frozen::Dense(w) => match blas_matmul(&g, w, false)? {
                Some(gx) => (gx, w.dim(1)?),
                None => (g.matmul(w)?, w.dim(1)?),
            },
            // Dequantized a chunk at a time for this product only.
            Frozen::Quantized(q) => (q.grad_input(&g)?, q.dims().1),
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = inp;
        Ok(Some(g.reshape(shape)?))
    }
}

/// Norms and softmax run in f32 even for half-precision models, as the references do.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// A frozen 2-D weight `[out, in]` kept quantized in memory (any GGUF block type candle
/// knows: Q4_0 ... Q8_0, Q2_K ... Q6_K).
///
/// On the CPU the blocks are held as they are and candle's k-quant kernels are called
/// directly: candle's own `QTensor` op would build a second, repacked copy of Q4_K / Q6_K /
/// Q8_0 weights on x86 (6 bits per weight more for Q4_K), which defeats the point of a 4-bit
/// base. Other devices use `QTensor` and its kernels.
pub struct QMatrix {
    inner: QInner,
    dtype: GgmlDType,
    out: usize,
    inp: usize,
}

enum QInner {
    Cpu(Box<dyn QuantizedType>),
    Device(QTensor),
}

/// How a quantized matmul runs on the CPU. `Kernel` quantizes the activations to 8 bits
/// (ggml's scheme: Q8_K for K-quants, Q8_0 for Q8_0) and runs candle's integer dot products;
/// `Dequantize` expands the weight to f32 for the one product and runs the f32 GEMM, so
/// the only error is the weight's own quantization. Chosen by the number of activation rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QMatMulKernel {
    Kernel,
    Dequantize,
}

/// Largest f32 slice of a weight dequantized at once on the CPU. 16 MiB: under glibc's largest
/// mmap threshold, so the buffer is recycled by the allocator instead of being mapped and
/// page-faulted afresh for every product (which made a whole-weight dequantization of a
/// Qwen3-4B MLP matrix cost 3-5x its decoding time), and few enough chunks that the GEMM does
/// not re-pack the activations too often (4 MiB chunks measured slower at 77 tokens).
pub const DEQUANTIZE_CHUNK_BYTES: usize = 16 << 20;

/// Rows (tokens in the batch) from which the CPU dequantizes instead of using the integer
/// kernels: the integer kernel's cost grows with every row, the dequantization is paid once
/// per product. Measured crossovers on a 2-core AVX2 machine (docs/gguf.md): about 32 rows
/// for Q8_0, 64 for the K-quants. `QWENCLIP_QMATMUL=kernel|dequantize` forces one.
pub fn dequantize_from_rows(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q8_0 | GgmlDType::Q8_1 => 32,
        _ => 64,
    }
}

fn cpu_strategy(dtype: GgmlDType, rows: usize) -> QMatMulKernel {
    static OVERRIDE: std::sync::OnceLock<Option<QMatMulKernel>> = std::sync::OnceLock::new();
    let forced = OVERRIDE.get_or_init(|| match std::env::var("QWENCLIP_QMATMUL").as_deref() {
        Ok("kernel") => Some(QMatMulKernel::Kernel),
        Ok("dequantize") => Some(QMatMulKernel::Dequantize),
        _ => None,
    });
    forced.unwrap_or(if rows >= dequantize_from_rows(dtype) {
        QMatMulKernel::Dequantize
    } else {
        QMatMulKernel::Kernel
    })
}

impl QMatrix {
    /// From the raw GGUF bytes of a `[out, in]` tensor of type `dtype`.
    pub fn from_bytes(
        data: &[u8],
        dtype: GgmlDType,
        (out, inp): (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        let block = dtype.block_size();
        if !inp.is_multiple_of(block) {
            candle_core::bail!(
                "a row of {inp} values is not a whole number of {dtype:?} blocks ({block})"
            );
        }
        let need = out * inp / block * dtype.type_size();
        if data.len() != need {
            candle_core::bail!(
                "{dtype:?} [{out}, {inp}] needs {need} bytes, got {}",
                data.len()
            );
        }
        use std::borrow::Cow;
        let inner = match device {
            Device::Cpu => QInner::Cpu(with_aligned(data, |b| dtype.from_data(Cow::Borrowed(b)))),
            d => QInner::Device(QTensor::new(
                with_aligned(data, |b| QStorage::from_data(Cow::Borrowed(b), d, dtype))?,
                (out, inp),
            )?),
        };
        Ok(Self {
            inner,
            dtype,
            out,
            inp,
        })
    }

    /// Quantizes a dense `[out, in]` weight (tests, `qwenclip quantize`).
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let q = QTensor::quantize(&w.to_device(&Device::Cpu)?, dtype)?;
        Self::from_bytes(&q.data()?, dtype, (out, inp), w.device())
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    pub fn device(&self) -> Device {
        match &self.inner {
            QInner::Cpu(_) => Device::Cpu,
            QInner::Device(q) => q.device(),
        }
    }

    /// Bytes of the quantized blocks.
    pub fn storage_bytes(&self) -> usize {
        match &self.inner {
            QInner::Cpu(s) => s.storage_size_in_bytes(),
            QInner::Device(q) => q.storage_size_in_bytes(),
        }
    }

    /// The weight as f32 `[out, in]` on its device (a new tensor every call; on the CPU the
    /// blocks are expanded on every core).
    pub fn dequantize(&self) -> Result<Tensor> {
        self.dequantize_rows(0, self.out)
    }

    /// Rows `r0..r1` of the weight as f32 `[r1 - r0, in]`.
    pub fn dequantize_rows(&self, r0: usize, r1: usize) -> Result<Tensor> {
        match &self.inner {
            QInner::Cpu(s) => {
                let v = dequantize_cpu_rows(s.as_ref(), self.dtype, self.inp, (r0, r1))?;
                Tensor::from_vec(v, (r1 - r0, self.inp), &Device::Cpu)
            }
            QInner::Device(q) => q.dequantize(&q.device())?.narrow(0, r0, r1 - r0),
        }
    }

    /// Row ranges of at most [`DEQUANTIZE_CHUNK_BYTES`] of f32 each.
    fn row_chunks(&self) -> Vec<(usize, usize)> {
        let rows = (DEQUANTIZE_CHUNK_BYTES / (4 * self.inp.max(1))).max(1);
        (0..self.out)
            .step_by(rows)
            .map(|r0| (r0, (r0 + rows).min(self.out)))
            .collect()
    }

    /// `x @ W.T` (`x` `[rows, in]` f32) through the dequantized weight, a chunk of rows at
    /// a time (see [`DEQUANTIZE_CHUNK_BYTES`]): the f32 copy never exceeds one chunk.
    fn dequantized_matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let chunks = self.row_chunks();
        if let [(r0, r1)] = chunks[..] {
            return matmul_t(x, &self.dequantize_rows(r0, r1)?);
        }
        let parts = chunks
            .into_iter()
            .map(|(r0, r1)| matmul_t(x, &self.dequantize_rows(r0, r1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// `g @ W` (`g` `[rows, out]`): the input gradient of `x @ W.T`, dequantizing a chunk of
    /// rows of `W` at a time.
    pub fn grad_input(&self, g: &Tensor) -> Result<Tensor> {
        if !matches!(self.inner, QInner::Cpu(_)) {
            return g.matmul(&self.dequantize()?.to_dtype(g.dtype())?);
        }
        let mut acc: Option<Tensor> = None;
        for (r0, r1) in self.row_chunks() {
            let w = self.dequantize_rows(r0, r1)?.to_dtype(g.dtype())?;
            let part = g.narrow(1, r0, r1 - r0)?.contiguous()?.matmul(&w)?;
            acc = Some(match acc {
                None => part,
                Some(a) => (a + part)?,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("empty weight".into()))
    }

    /// Rows `ids` (u32, any shape) of the weight read as an embedding table: `[..., in]` f32.
    /// Only the selected rows are dequantized.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.inner {
            QInner::Cpu(s) => {
                let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                if let Some(&bad) = flat.iter().find(|&&i| i as usize >= self.out) {
                    candle_core::bail!("token id {bad} is out of range for {} rows", self.out);
                }
                let mut shape = ids.dims().to_vec();
                shape.push(self.inp);
                match s.embedding(&flat, self.out, self.inp)? {
                    CpuStorage::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
                    _ => candle_core::bail!("embedding returned a non-f32 storage"),
                }
            }
            QInner::Device(q) => q.embedding(ids),
        }
    }

    /// `x @ W.T` for `x` `[..., in]` in any float dtype; no gradient (see
    /// [`quantized_linear`]). On the CPU the kernel is chosen by the number of rows.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.inp.max(1);
        self.forward_with(x, cpu_strategy(self.dtype, rows))
    }

    /// [`QMatrix::forward`] with the CPU kernel chosen by the caller (other devices always
    /// use candle's quantized kernels).
    pub fn forward_with(&self, x: &Tensor, kernel: QMatMulKernel) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / self.inp.max(1);
        let y = match &self.inner {
            QInner::Cpu(_) if kernel == QMatMulKernel::Dequantize => self.dequantized_matmul_t(
                &x.to_dtype(DType::F32)?
                    .reshape((rows, self.inp))?
                    .contiguous()?,
            )?,
            QInner::Cpu(_) => x
                .to_dtype(DType::F32)?
                .reshape((rows, self.inp))?
                .contiguous()?
                .apply_op1_no_bwd(self)?,
            QInner::Device(q) => x
                .to_dtype(DType::F32)?
                .reshape((rows, self.inp))?
                .contiguous()?
                .apply_op1_no_bwd(q)?,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.out;
        y.reshape(out)?.to_dtype(dtype)
    }
}

/// Expands rows `r0..r1` of a CPU weight (`inp` values per row) to f32 with candle's block
/// decoders, splitting the blocks over the cores (candle's own `dequantize` is
/// single-threaded and all-or-nothing). About 0.55 ns per value on the 2-core test machine,
/// where it is bound by memory bandwidth rather than by the decoding.
fn dequantize_cpu_rows(
    s: &dyn QuantizedType,
    dtype: GgmlDType,
    inp: usize,
    (r0, r1): (usize, usize),
) -> Result<Vec<f32>> {
    use candle_core::quantized::k_quants::*;
    fn parallel<T: GgmlType>(s: &dyn QuantizedType, inp: usize, r0: usize, r1: usize) -> Vec<f32> {
        let blocks_len = s.storage_size_in_bytes() / std::mem::size_of::<T>();
        // SAFETY: the CPU storage of a `T`-typed tensor is a `Vec<T>` (candle implements
        // `QuantizedType` for `Vec<T>`), and `as_ptr` is that vector's pointer.
        let all = unsafe { std::slice::from_raw_parts(s.as_ptr() as *const T, blocks_len) };
        let per_row = inp / T::BLCK_SIZE;
        let blocks = &all[r0 * per_row..r1 * per_row];
        let mut ys = vec![0f32; (r1 - r0) * inp];
        let threads = candle_core::utils::get_num_threads().clamp(1, 16);
        if threads == 1 || ys.len() < (1 << 18) {
            T::to_float(blocks, &mut ys);
            return ys;
        }
        let per = blocks.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (b, y) in blocks.chunks(per).zip(ys.chunks_mut(per * T::BLCK_SIZE)) {
                scope.spawn(move || T::to_float(b, y));
            }
        });
        ys
    }
    let rows = s.storage_size_in_bytes() / (inp / dtype.block_size() * dtype.type_size());
    if s.dtype() != dtype || r0 > r1 || r1 > rows {
        candle_core::bail!("rows {r0}..{r1} of a {dtype:?} weight with {rows} rows of {inp}");
    }
    Ok(match dtype {
        GgmlDType::Q4_0 => parallel::<BlockQ4_0>(s, inp, r0, r1),
        GgmlDType::Q4_1 => parallel::<BlockQ4_1>(s, inp, r0, r1),
        GgmlDType::Q5_0 => parallel::<BlockQ5_0>(s, inp, r0, r1),
        GgmlDType::Q5_1 => parallel::<BlockQ5_1>(s, inp, r0, r1),
        GgmlDType::Q8_0 => parallel::<BlockQ8_0>(s, inp, r0, r1),
        GgmlDType::Q2K => parallel::<BlockQ2K>(s, inp, r0, r1),
        GgmlDType::Q3K => parallel::<BlockQ3K>(s, inp, r0, r1),
        GgmlDType::Q4K => parallel::<BlockQ4K>(s, inp, r0, r1),
        GgmlDType::Q5K => parallel::<BlockQ5K>(s, inp, r0, r1),
        GgmlDType::Q6K => parallel::<BlockQ6K>(s, inp, r0, r1),
        _ => match s.dequantize(rows * inp)? {
            CpuStorage::F32(v) => v[r0 * inp..r1 * inp].to_vec(),
            _ => candle_core::bail!("dequantize returned a non-f32 storage"),
        },
    })
}

/// Runs `f` on the bytes of `data`, first copied into an 8-byte aligned buffer when they are
/// not aligned already (candle reinterprets them as blocks, which needs their alignment).
fn with_aligned<R>(data: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if (data.as_ptr() as usize).is_multiple_of(8) {
        return f(data);
    }
    let mut words = vec![0u64; data.len().div_ceil(8)];
    // SAFETY: `words` owns at least `data.len()` initialised bytes and u8 has alignment 1.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, data.len()) };
    bytes.copy_from_slice(data);
    f(bytes)
}

impl CustomOp1 for QMatrix {
    fn name(&self) -> &'static str {
        "qwenclip-qmatmul"
    }

    /// `x` `[rows, in]` f32 contiguous -> `[rows, out]` f32 through candle's k-quant kernel.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let QInner::Cpu(w) = &self.inner else {
            candle_core::bail!("quantized matmul: weight is not on the cpu");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("quantized matmul: input is not contiguous");
        }
        let (rows, k) = layout.shape().dims2()?;
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..][..rows * k];
        let mut y = vec![0f32; rows * self.out];
        w.matmul_t((rows, k, self.out), x, &mut y)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, self.out))))
    }
}
