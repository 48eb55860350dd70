//! [`QMatrix`]: a frozen weight kept in its GGUF block format, and its products.

use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use super::{matmul_t, qgemm};

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

/// How a quantized matmul runs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QMatMulKernel {
    /// The integer kernels of [`qgemm`](super::qgemm) (8-bit activations, run-time SIMD
    /// dispatch), for every type they read (all but Q2_K and Q3_K).
    Integer,
    /// candle's per-row k-quant dot products (8-bit activations; portable code, as candle's
    /// SIMD paths are chosen at compile time), for the types the integer kernels do not read.
    Candle,
    /// The weight expanded to f32 for the one product and the f32 GEMM: the only error is the
    /// weight's own quantization.
    Dequantize,
}

/// Largest f32 slice of a weight dequantized at once on the CPU. 16 MiB: under glibc's largest
/// mmap threshold, so the buffer is recycled by the allocator instead of being mapped and
/// page-faulted afresh for every product (which made a whole-weight dequantization of a
/// Qwen3-4B MLP matrix cost 3-5x its decoding time), and few enough chunks that the GEMM does
/// not re-pack the activations too often (4 MiB chunks measured slower at 77 tokens).
pub const DEQUANTIZE_CHUNK_BYTES: usize = 16 << 20;

/// Rows (tokens in the batch) from which the CPU dequantizes instead of running candle's
/// per-row kernels, for the types the integer kernels do not read: candle's cost grows with
/// every row, the dequantization is paid once per product (crossover measured at ~64 rows on
/// a 2-core machine, docs/gguf.md).
pub fn dequantize_from_rows(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q8_0 | GgmlDType::Q8_1 => 32,
        _ => 64,
    }
}

/// `QWENCLIP_QMATMUL=integer|candle|dequantize` forces one kernel (where it applies).
fn cpu_strategy(dtype: GgmlDType, rows: usize) -> QMatMulKernel {
    static OVERRIDE: std::sync::OnceLock<Option<QMatMulKernel>> = std::sync::OnceLock::new();
    let forced = OVERRIDE.get_or_init(|| match std::env::var("QWENCLIP_QMATMUL").as_deref() {
        Ok("integer") => Some(QMatMulKernel::Integer),
        Ok("candle") => Some(QMatMulKernel::Candle),
        Ok("dequantize") => Some(QMatMulKernel::Dequantize),
        _ => None,
    });
    match *forced {
        Some(QMatMulKernel::Integer) if !qgemm::supports(dtype) => QMatMulKernel::Candle,
        Some(k) => k,
        None if qgemm::supports(dtype) => QMatMulKernel::Integer,
        None if rows >= dequantize_from_rows(dtype) => QMatMulKernel::Dequantize,
        None => QMatMulKernel::Candle,
    }
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
    /// [`quantized_linear`](super::quantized_linear)). On the CPU the kernel is chosen by the
    /// number of rows.
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
        let x = x
            .to_dtype(DType::F32)?
            .reshape((rows, self.inp))?
            .contiguous()?;
        let y = match &self.inner {
            QInner::Cpu(_) if kernel == QMatMulKernel::Dequantize => {
                self.dequantized_matmul_t(&x)?
            }
            QInner::Cpu(w) if kernel == QMatMulKernel::Integer && qgemm::supports(self.dtype) => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                // SAFETY: the CPU storage of a quantized tensor is a `Vec` of its blocks, whose
                // bytes `as_ptr` and `storage_size_in_bytes` describe.
                let bytes =
                    unsafe { std::slice::from_raw_parts(w.as_ptr(), w.storage_size_in_bytes()) };
                let y = qgemm::matmul_t(
                    bytes,
                    self.dtype,
                    (self.out, self.inp),
                    &xs,
                    rows,
                    qgemm::Isa::best(),
                )
                .ok_or_else(|| candle_core::Error::Msg("qgemm: unsupported type".into()))?;
                Tensor::from_vec(y, (rows, self.out), &Device::Cpu)?
            }
            QInner::Cpu(_) => x.apply_op1_no_bwd(self)?,
            QInner::Device(q) => x.apply_op1_no_bwd(q)?,
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
