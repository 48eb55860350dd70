//! The integer kernels of quantized products (`ops::qgemm`) against dequantize + f64, for
//! every type the GGUF loader accepts and every instruction set this CPU runs.
//!
//! Two checks per output value `y = x @ W.T` (W as the file stores it, dequantized):
//! - against the same product in f64 with the activations the kernels actually used (8-bit
//!   per block of 32, or 256 for the K-quants): only f32 accumulation differs,
//!   `<= 1e-5 * sum |w| |x_hat|`;
//! - against the exact product in f64: within the activation-rounding bound
//!   `sum over blocks of (max |x| / 127) / 2 * sum |w|` (+ the f32 term above).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use qwenclip::ops::qgemm::{self, Isa, QActs};
use qwenclip::ops::{QMatMulKernel, QMatrix};
use qwenclip::rng::Rng;

const INTEGER_TYPES: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

struct Case {
    dtype: GgmlDType,
    w_deq: Vec<f32>,
    bytes: Vec<u8>,
    x: Vec<f32>,
    m: usize,
    k: usize,
    n: usize,
}

/// A random weight with a few large rows and an activation with outlier channels (as LLM
/// activations have), so that the block scales differ.
fn case(dtype: GgmlDType, (m, k, n): (usize, usize, usize), seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let mut w = rng.normal_vec(m * k, 0.05);
    for v in w[..k].iter_mut() {
        *v *= 8.0;
    }
    let mut x = rng.normal_vec(n * k, 1.0);
    for r in 0..n {
        x[r * k + 7] = 40.0;
        x[r * k + k / 2] = -25.0;
    }
    let wt = Tensor::from_vec(w, (m, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&wt, dtype).unwrap();
    let w_deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    Case {
        dtype,
        w_deq,
        bytes: q.data().unwrap().into_owned(),
        x,
        m,
        k,
        n,
    }
}

/// Half a quantization step per activation value: `sum over blocks of (max |x| / 127) / 2 *
/// sum |w|`.
fn rounding_bound(x: &[f32], w: &[f32], block: usize) -> f64 {
    x.chunks(block)
        .zip(w.chunks(block))
        .map(|(xb, wb)| {
            let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
            step / 2.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
        })
        .sum()
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn abs_dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (a as f64 * b as f64).abs())
        .sum()
}

/// Checks `y` (`[n, m]`) against both references; returns the largest error relative to
/// the activation bound.
fn check(c: &Case, y: &[f32], what: &str) -> f64 {
    let block = qgemm::activation_block(c.dtype);
    let acts = QActs::quantize(&c.x, c.n, c.k, c.n, block);
    let mut worst = 0f64;
    for r in 0..c.n {
        let x = &c.x[r * c.k..][..c.k];
        let x_hat = acts.dequantized_row(r, c.k);
        for o in 0..c.m {
            let w = &c.w_deq[o * c.k..][..c.k];
            let got = y[r * c.m + o] as f64;
            let f32_slack = 1e-5 * abs_dot64(w, &x_hat);
            let same = dot64(w, &x_hat);
            assert!(
                (got - same).abs() <= f32_slack,
                "{what} [{r},{o}]: {got} vs {same} with the kernels' activations (slack {f32_slack:e})"
            );
            let bound = rounding_bound(x, w, block) + f32_slack;
            let exact = dot64(w, x);
            assert!(
                (got - exact).abs() <= bound,
                "{what} [{r},{o}]: {got} vs exact {exact}, bound {bound:e}"
            );
            worst = worst.max((got - exact).abs() / bound);
        }
    }
    worst
}

#[test]
fn every_type_and_instruction_set_is_within_the_activation_rounding_bound() {
    println!("instruction sets on this CPU: {:?}", Isa::available());
    for dtype in INTEGER_TYPES {
        // Rows not a multiple of the 16-row tasks nor of the micro-tiles; 5 activation rows.
        let c = case(dtype, (37, 512, 5), 3);
        for isa in Isa::available() {
            let y = qgemm::matmul_t(&c.bytes, dtype, (c.m, c.k), &c.x, c.n, isa).unwrap();
            let worst = check(&c, &y, &format!("{dtype:?} {isa:?}"));
            println!("{dtype:?} {isa:?}: largest error / bound {worst:.3}");
        }
    }
}

#[test]
fn rows_that_are_not_a_whole_simd_step_are_padded() {
    // 96 values: one and a half 512-bit steps, 6 groups (not a whole vector of minimums).
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q5_1] {
        let c = case(dtype, (9, 96, 3), 5);
        for isa in Isa::available() {
            let y = qgemm::matmul_t(&c.bytes, dtype, (c.m, c.k), &c.x, c.n, isa).unwrap();
            check(&c, &y, &format!("{dtype:?} {isa:?} k=96"));
        }
    }
}

#[test]
fn instruction_sets_agree_and_thread_count_does_not_matter() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let c = case(dtype, (70, 1024, 6), 9);
        let run = |isa, threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| qgemm::matmul_t(&c.bytes, dtype, (c.m, c.k), &c.x, c.n, isa))
                .unwrap()
        };
        let base = run(Isa::Portable, 1);
        for isa in Isa::available() {
            let one = run(isa, 1);
            assert_eq!(one, run(isa, 3), "{dtype:?} {isa:?}: 1 vs 3 threads");
            let scale = base.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = one
                .iter()
                .zip(&base)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{dtype:?} {isa:?} vs portable: {diff}"
            );
        }
    }
}

#[test]
fn a_non_finite_activation_reaches_the_output() {
    let c = case(GgmlDType::Q4K, (16, 256, 2), 4);
    let mut x = c.x.clone();
    x[3] = f32::NAN;
    for isa in Isa::available() {
        let y = qgemm::matmul_t(&c.bytes, GgmlDType::Q4K, (c.m, c.k), &x, 2, isa).unwrap();
        assert!(y[..c.m].iter().all(|v| v.is_nan()), "{isa:?}: row 0");
        assert!(y[c.m..].iter().all(|v| v.is_finite()), "{isa:?}: row 1");
    }
}

#[test]
fn candle_kernels_run_the_other_types_within_their_bound() {
    // Q2_K and Q3_K go through candle's per-row kernels, whose activations are quantized
    // per 256 values (Q8_K): the same bound with blocks of 256 (a coarser step).
    for dtype in [GgmlDType::Q2K, GgmlDType::Q3K] {
        assert!(!qgemm::supports(dtype));
        let c = case(dtype, (8, 512, 3), 6);
        let q = QMatrix::from_bytes(&c.bytes, dtype, (c.m, c.k), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(c.x.clone(), (c.n, c.k), &Device::Cpu).unwrap();
        let y: Vec<f32> = q
            .forward_with(&x, QMatMulKernel::Candle)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for r in 0..c.n {
            let xr = &c.x[r * c.k..][..c.k];
            for o in 0..c.m {
                let w = &c.w_deq[o * c.k..][..c.k];
                let bound = rounding_bound(xr, w, 256) + 1e-5 * abs_dot64(w, xr);
                let got = y[r * c.m + o] as f64;
                let exact = dot64(w, xr);
                assert!(
                    (got - exact).abs() <= bound,
                    "{dtype:?} [{r},{o}]: {got} vs {exact}, bound {bound:e}"
                );
            }
        }
    }
}

#[test]
fn qmatrix_runs_the_integer_kernels_for_their_types() {
    let c = case(GgmlDType::Q4K, (40, 256, 3), 8);
    let q = QMatrix::from_bytes(&c.bytes, GgmlDType::Q4K, (c.m, c.k), &Device::Cpu).unwrap();
    let x = Tensor::from_vec(c.x.clone(), (c.n, c.k), &Device::Cpu).unwrap();
    let via_matrix: Vec<f32> = q
        .forward_with(&x, QMatMulKernel::Integer)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let direct =
        qgemm::matmul_t(&c.bytes, GgmlDType::Q4K, (c.m, c.k), &c.x, c.n, Isa::best()).unwrap();
    assert_eq!(via_matrix, direct);
}
