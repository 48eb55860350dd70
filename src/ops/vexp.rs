//! A vectorisable `exp` for the CPU kernels (softmax, SiLU, exact GELU and their backward).
//!
//! candle's CPU softmax and SiLU call libm's scalar `expf` per element; on Qwen3-0.6B at
//! 2x256 tokens that alone was ~0.45 s of a 3.9 s forward pass. This is the Cephes `expf`
//! (range reduction by ln 2, degree-6 polynomial, ~1 ulp) written branch-free so that LLVM
//! turns the loops into AVX2 code, selected at run time when the CPU has it.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `exp` underflows: the result is 0 (masked attention logits land here).
const MIN_X: f32 = -87.336_55;
/// Above this `2^n` would overflow the exponent; clamped (the callers never get there).
const MAX_X: f32 = 88.376_26;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
fn exp1(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    let kr = xc * LOG2E + ROUND;
    let n = kr.to_bits() as i32 - ROUND.to_bits() as i32;
    let k = kr - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n + 127) << 23) as u32);
    if x < MIN_X {
        0.0
    } else {
        y * scale
    }
}

/// Runs `body` compiled for AVX2+FMA when the CPU has them, else for the baseline target.
macro_rules! dispatch {
    ($generic:ident, $avx2:ident, ($($arg:ident: $ty:ty),*), $body:block) => {
        #[inline(always)]
        fn $generic($($arg: $ty),*) $body

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }
    };
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        });
        *HAS
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

const LANES: usize = 8;

dispatch!(softmax_rows_generic, softmax_rows_avx2, (s: &mut [f32], bias: &[f32], cols: usize, scale: f32), {
    // Max and sum run in LANES independent accumulators so that they vectorise (a single
    // float accumulator is a serial chain under strict IEEE semantics).
    for (row, b) in s.chunks_exact_mut(cols).zip(bias.chunks_exact(cols)) {
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut xs = row.chunks_exact_mut(LANES);
        let mut bs = b.chunks_exact(LANES);
        for (x, b) in (&mut xs).zip(&mut bs) {
            for l in 0..LANES {
                x[l] = x[l] * scale + b[l];
                max[l] = max[l].max(x[l]);
            }
        }
        for (x, &b) in xs.into_remainder().iter_mut().zip(bs.remainder()) {
            *x = *x * scale + b;
            max[0] = max[0].max(*x);
        }
        let max = max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = [0.0f32; LANES];
        let mut xs = row.chunks_exact_mut(LANES);
        for x in &mut xs {
            for l in 0..LANES {
                x[l] = exp1(x[l] - max);
                sum[l] += x[l];
            }
        }
        for x in xs.into_remainder() {
            *x = exp1(*x - max);
            sum[0] += *x;
        }
        let inv = 1.0 / sum.iter().sum::<f32>();
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
});

/// Row-wise `softmax(s * scale + bias)` in place; `s` and `bias` are row-major with `cols`
/// columns (bias rows hold 0 or a large negative mask value). A fully masked row comes out
/// uniform, as the unfused softmax gives it.
pub fn softmax_rows(s: &mut [f32], bias: &[f32], cols: usize, scale: f32) {
    debug_assert_eq!(s.len(), bias.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { softmax_rows_avx2(s, bias, cols, scale) };
    }
    softmax_rows_generic(s, bias, cols, scale)
}

dispatch!(silu_mul_generic, silu_mul_avx2, (gate: &[f32], up: &[f32], out: &mut [f32]), {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * u / (1.0 + exp1(-g));
    }
});

/// `out = silu(gate) * up`, elementwise.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    silu_mul_generic(gate, up, out)
}

dispatch!(silu_mul_backward_generic, silu_mul_backward_avx2, (gate: &[f32], up: &[f32], dy: &[f32], d_gate: &mut [f32], d_up: &mut [f32]), {
    for ((((dg, du), &g), &u), &dy) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(dy) {
        let s = 1.0 / (1.0 + exp1(-g));
        *du = dy * g * s;
        *dg = dy * u * s * (1.0 + g * (1.0 - s));
    }
});

/// The gradients of `silu(gate) * up` given the output's `dy`: `d_up = dy silu(gate)`,
/// `d_gate = dy up s (1 + gate (1 - s))` with `s = sigmoid(gate)`.
pub fn silu_mul_backward(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    debug_assert!(gate.len() == up.len() && up.len() == dy.len());
    debug_assert!(d_gate.len() == dy.len() && d_up.len() == dy.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { silu_mul_backward_avx2(gate, up, dy, d_gate, d_up) };
    }
    silu_mul_backward_generic(gate, up, dy, d_gate, d_up)
}

/// `erf` (Abramowitz & Stegun 7.1.26, absolute error <= 1.5e-7) and the standard normal's
/// density, `(erf(x / sqrt 2), exp(-x^2 / 2) / sqrt(2 pi))`, branch-free.
#[inline(always)]
fn erf_and_density(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let e = exp1(-a * a);
    let erf = (1.0 - poly * e).copysign(z);
    (erf, e * FRAC_1_SQRT_2PI)
}

dispatch!(gelu_erf_generic, gelu_erf_avx2, (x: &[f32], out: &mut [f32]), {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = 0.5 * x * (1.0 + erf_and_density(x).0);
    }
});

/// `out = x Phi(x)` (exact GELU: `Phi` the standard normal CDF), elementwise.
pub fn gelu_erf(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { gelu_erf_avx2(x, out) };
    }
    gelu_erf_generic(x, out)
}

dispatch!(gelu_erf_backward_generic, gelu_erf_backward_avx2, (x: &[f32], dy: &[f32], dx: &mut [f32]), {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        let (erf, density) = erf_and_density(x);
        *dx = dy * (0.5 * (1.0 + erf) + x * density);
    }
});

/// The gradient of exact GELU given the output's `dy`: `dx = dy (Phi(x) + x phi(x))`.
pub fn gelu_erf_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    debug_assert!(x.len() == dy.len() && dy.len() == dx.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { gelu_erf_backward_avx2(x, dy, dx) };
    }
    gelu_erf_backward_generic(x, dy, dx)
}

dispatch!(exp_generic, exp_avx2, (xs: &mut [f32]), {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
});

/// `exp` in place (what the kernels above use, exposed for its accuracy test).
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { exp_avx2(xs) };
    }
    exp_generic(xs)
}
