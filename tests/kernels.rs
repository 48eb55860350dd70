//! The CPU inference kernels against independent references: the vectorised `exp`, fused
//! softmax and SiLU against f64 math; the system-BLAS products and the fused attention
//! against candle's own ops (the composed path, itself checked against `transformers` in
//! tests/parity.rs and against finite differences in tests/gradients.rs).
//!
//! Without a system BLAS (OpenBLAS/MKL/BLIS) the BLAS tests say so and return, unless
//! `QWENCLIP_REQUIRE_BLAS` is set, as `.ci/run` does after installing OpenBLAS: then a
//! missing BLAS fails them.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use qwenclip::lora::{LoraLinear, LoraPair};
use qwenclip::ops::{self, blas, vexp};
use qwenclip::rng::Rng;
use qwenclip::ForwardMode;

fn blas_loaded(what: &str) -> bool {
    if blas::get().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("QWENCLIP_REQUIRE_BLAS").is_none(),
        "{what}: QWENCLIP_REQUIRE_BLAS is set but no system BLAS was loaded ({})",
        blas::describe()
    );
    eprintln!("{what}: no system BLAS on this machine; only candle's GEMM is exercised");
    false
}

fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).normal_vec(n, std), shape, &Device::Cpu).unwrap()
}

fn rel_err(got: f32, want: f64) -> f64 {
    (f64::from(got) - want).abs() / want.abs().max(1e-30)
}

#[test]
fn vectorised_exp_is_within_two_ulp_and_underflows_to_zero() {
    let xs: Vec<f32> = (0..200_001)
        .map(|i| -87.3 + i as f32 * (175.6 / 200_000.0))
        .collect();
    let mut got = xs.clone();
    vexp::exp_in_place(&mut got);
    let worst = xs
        .iter()
        .zip(&got)
        .map(|(&x, &y)| rel_err(y, f64::from(x).exp()))
        .fold(0.0, f64::max);
    assert!(worst < 2.5e-7, "exp: worst relative error {worst:e}");
    let mut tiny = vec![-88.0f32, -1e9, f32::NEG_INFINITY];
    vexp::exp_in_place(&mut tiny);
    assert_eq!(tiny, [0.0, 0.0, 0.0]);
    let mut one = vec![0.0f32];
    vexp::exp_in_place(&mut one);
    assert_eq!(one, [1.0]);
}

#[test]
fn fused_softmax_rows_match_f64_including_masks_and_a_fully_masked_row() {
    let cols = 37; // not a multiple of the 8 lanes
    let rows = 5;
    let s: Vec<f32> = Rng::new(1).normal_vec(rows * cols, 3.0);
    let mut bias = vec![0f32; rows * cols];
    for (r, row) in bias.chunks_mut(cols).enumerate() {
        for (j, b) in row.iter_mut().enumerate() {
            if j > r * 8 || r == 4 {
                *b = ops::MASKED as f32; // causal-like, and row 4 fully masked
            }
        }
    }
    let scale = 0.125;
    let mut got = s.clone();
    vexp::softmax_rows(&mut got, &bias, cols, scale);
    for r in 0..rows {
        let z: Vec<f64> = (0..cols)
            .map(|j| f64::from(s[r * cols + j]) * scale as f64 + f64::from(bias[r * cols + j]))
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
        for j in 0..cols {
            let want = if r == 4 {
                1.0 / cols as f64 // -1e9 + small rounds to -1e9 in f32: uniform
            } else {
                (z[j] - m).exp() / sum
            };
            let g = got[r * cols + j];
            assert!(
                (f64::from(g) - want).abs() <= 1e-6 * want.max(1e-3),
                "row {r} col {j}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn fused_silu_mul_matches_f64() {
    let n = 4099;
    let g: Vec<f32> = Rng::new(2).normal_vec(n, 6.0);
    let u: Vec<f32> = Rng::new(3).normal_vec(n, 1.0);
    let mut out = vec![0f32; n];
    vexp::silu_mul(&g, &u, &mut out);
    for i in 0..n {
        let (gi, ui) = (f64::from(g[i]), f64::from(u[i]));
        let want = gi / (1.0 + (-gi).exp()) * ui;
        assert!(
            (f64::from(out[i]) - want).abs() <= 1e-6 * want.abs().max(1e-2),
            "{i}: {} vs {want}",
            out[i]
        );
    }
    // Through the op, with the tensor path it replaces on tracked inputs.
    let gt = Tensor::from_vec(g, (1, n), &Device::Cpu).unwrap();
    let ut = Tensor::from_vec(u, (1, n), &Device::Cpu).unwrap();
    let fused = ops::silu_mul(&gt, &ut).unwrap();
    let tracked = ops::silu_mul(Var::from_tensor(&gt).unwrap().as_tensor(), &ut).unwrap();
    assert!(max_diff(&fused, &tracked) < 1e-5);
}

#[test]
fn blas_products_equal_candle_gemm() {
    if !blas_loaded("blas products") {
        return;
    }
    for (m, n, k) in [
        (1, 1, 1),
        (3, 5, 7),
        (77, 96, 64),
        (130, 300, 33),
        (0, 4, 4),
    ] {
        let x = randn(&[m, k], 10, 1.0);
        let w = randn(&[n, k], 11, 1.0);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = ops::matmul_t(&x, &w).unwrap();
        assert_eq!(got.dims(), [m, n]);
        if m > 0 {
            assert!(max_diff(&got, &want) < 1e-4, "matmul_t {m}x{n}x{k}");
        }
        // Rank 3 input, as the models call it.
        let x3 = randn(&[2, m, k], 12, 1.0);
        let want3 = x3.broadcast_matmul(&w.t().unwrap()).unwrap();
        if m > 0 {
            assert!(max_diff(&ops::matmul_t(&x3, &w).unwrap(), &want3) < 1e-4);
        }
    }
    // Batched, both orientations (attention's products).
    let a = randn(&[2, 3, 40, 16], 13, 1.0);
    let b = randn(&[2, 3, 24, 16], 14, 1.0);
    let want = a.matmul(&b.t().unwrap()).unwrap();
    assert!(max_diff(&ops::batched_matmul(&a, &b, true).unwrap(), &want) < 1e-4);
    let c = randn(&[2, 3, 16, 24], 15, 1.0);
    let want = a.matmul(&c).unwrap();
    assert!(max_diff(&ops::batched_matmul(&a, &c, false).unwrap(), &want) < 1e-4);
}

/// `[B,1,1,T,T]` causal + padding bias, as the model builds it.
fn bias(mask: &[Vec<u8>]) -> Tensor {
    let (b, t) = (mask.len(), mask[0].len());
    let mut v = vec![0f32; b * t * t];
    for (bi, row) in mask.iter().enumerate() {
        for i in 0..t {
            for j in 0..t {
                if j > i || row[j] == 0 {
                    v[(bi * t + i) * t + j] = ops::MASKED as f32;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, 1, t, t), &Device::Cpu).unwrap()
}

/// `(B, heads, kv_heads, T, head_dim)` for the attention tests: 150 tokens are three query
/// blocks, the last one partial; GQA 4:2.
const ATTENTION_DIMS: (usize, usize, usize, usize, usize) = (3, 4, 2, 150, 32);

/// Prompt lengths and padding masks for [`ATTENTION_DIMS`]: one full prompt, one padded, one
/// empty (every row masked).
fn padded_prompts() -> ([usize; 3], Vec<Vec<u8>>) {
    let t = ATTENTION_DIMS.3;
    let lens = [t, 61, 0];
    let mask = lens
        .iter()
        .map(|&l| (0..t).map(|j| u8::from(j < l)).collect())
        .collect();
    (lens, mask)
}

#[test]
fn fused_attention_equals_the_composed_ops_on_every_real_token() {
    if !blas_loaded("fused attention") {
        return;
    }
    let (b, nh, nkv, t, hd) = ATTENTION_DIMS;
    let (lens, mask) = padded_prompts();
    let q = randn(&[b, nh, t, hd], 30, 1.0);
    let k = randn(&[b, nkv, t, hd], 31, 1.0);
    let v = randn(&[b, nkv, t, hd], 32, 1.0);
    let bias = bias(&mask);
    let fused = ops::attention(&q, &k, &v, &bias, ForwardMode::Fast).unwrap();
    // A tracked input takes the composed (autograd) path.
    let qv = Var::from_tensor(&q).unwrap();
    let composed = ops::attention(qv.as_tensor(), &k, &v, &bias, ForwardMode::Fast).unwrap();
    assert_eq!(fused.dims(), [b, t, nh * hd]);
    assert!(fused
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
    for (bi, &len) in lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let f = fused.narrow(0, bi, 1).unwrap().narrow(1, 0, len).unwrap();
        let c = composed
            .narrow(0, bi, 1)
            .unwrap()
            .narrow(1, 0, len)
            .unwrap();
        let d = max_diff(&f, &c);
        assert!(d < 2e-5, "batch {bi}: max diff {d}");
    }
    assert_eq!(fused.dtype(), DType::F32);
}

/// `qwenclip encode` of the tiny model + adapter (a long and a short prompt: several query
/// blocks, padding) with extra environment; returns the output tensors.
fn encode_with(
    dir: &std::path::Path,
    tag: &str,
    env: &[(&str, &str)],
) -> std::collections::HashMap<String, Tensor> {
    let out = dir.join(format!("{tag}.safetensors"));
    let long = "a red cube left of a blue sphere under a wooden table, ".repeat(12);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qwenclip"));
    cmd.args(["encode", "--model"])
        .arg(dir.join("model"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .args([
            "--prompt",
            &long,
            "--prompt",
            "a cat",
            "--dump-hidden",
            "--out",
        ])
        .arg(&out)
        .current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    load(&out)
}

#[test]
fn encoding_is_the_same_on_any_number_of_threads_and_close_without_blas() {
    let d = scratch("kernels-threads");
    dev_tiny(&d);
    let one = encode_with(&d, "one", &[("RAYON_NUM_THREADS", "1")]);
    let two = encode_with(&d, "two", &[("RAYON_NUM_THREADS", "2")]);
    let three = encode_with(&d, "three", &[("RAYON_NUM_THREADS", "3")]);
    assert!(
        one["attention_mask"].dims()[1] > 100,
        "the long prompt spans query blocks"
    );
    for name in ["prompt_embeds", "pooled_prompt_embeds", "llm_hidden_states"] {
        assert_eq!(
            max_diff(&one[name], &two[name]),
            0.0,
            "{name}: 1 vs 2 threads"
        );
        assert_eq!(
            max_diff(&one[name], &three[name]),
            0.0,
            "{name}: 1 vs 3 threads"
        );
    }
    if blas_loaded("encode with and without BLAS") {
        let candle = encode_with(&d, "candle", &[("QWENCLIP_BLAS", "off")]);
        let mask = one["attention_mask"]
            .to_dtype(DType::U8)
            .unwrap()
            .to_vec2::<u8>()
            .unwrap();
        for (b, len) in lengths(&mask).into_iter().enumerate() {
            let real = |t: &Tensor| t.narrow(0, b, 1).unwrap().narrow(1, 0, len).unwrap();
            let h = max_diff(
                &real(&one["llm_hidden_states"]),
                &real(&candle["llm_hidden_states"]),
            );
            assert!(h < 1e-4, "hidden states, prompt {b}: BLAS vs candle {h}");
        }
        for name in ["prompt_embeds", "pooled_prompt_embeds"] {
            let d = max_diff(&one[name], &candle[name]);
            assert!(d < 1e-4, "{name}: BLAS vs candle {d}");
        }
    }
}

/// PyTorch's AdamW (decoupled decay, bias-corrected moments, gradients clipped by a factor),
/// in f64.
#[test]
fn fused_adamw_matches_pytorchs_formula_in_f64() {
    use qwenclip::training::optim::{AdamW, AdamWConfig};
    use std::collections::BTreeMap;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let n = 70_001; // several chunks, one partial
    let w0: Vec<f32> = Rng::new(40).normal_vec(n, 1.0);
    let mut opt = AdamW::new(cfg);
    let dev = Device::Cpu;
    for (name, decay) in [("decayed", true), ("plain", false)] {
        let var = Var::from_tensor(&Tensor::from_vec(w0.clone(), n, &dev).unwrap()).unwrap();
        opt.add(name.into(), var, usize::from(!decay), decay)
            .unwrap();
    }
    let lrs = [1e-2, 3e-3];
    let (mut w, mut m, mut v) = (
        [
            w0.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            w0.iter().map(|&x| f64::from(x)).collect(),
        ],
        [vec![0f64; n], vec![0f64; n]],
        [vec![0f64; n], vec![0f64; n]],
    );
    for t in 1..=3 {
        let g: Vec<f32> = Rng::new(100 + t).normal_vec(n, 0.5);
        let grads: BTreeMap<String, Tensor> = ["decayed", "plain"]
            .iter()
            .map(|k| (k.to_string(), Tensor::from_vec(g.clone(), n, &dev).unwrap()))
            .collect();
        // The second step clips (scales the gradients by 0.25).
        let clip = if t == 2 { 0.25 } else { 1.0 };
        opt.step(&grads, &lrs, clip).unwrap();
        for p in 0..2 {
            let (lr, wd) = (lrs[p], if p == 0 { cfg.weight_decay } else { 0.0 });
            let bc1 = 1.0 - cfg.beta1.powi(t as i32);
            let bc2 = 1.0 - cfg.beta2.powi(t as i32);
            for i in 0..n {
                let gi = f64::from(g[i]) * clip;
                m[p][i] = cfg.beta1 * m[p][i] + (1.0 - cfg.beta1) * gi;
                v[p][i] = cfg.beta2 * v[p][i] + (1.0 - cfg.beta2) * gi * gi;
                w[p][i] = w[p][i] * (1.0 - lr * wd)
                    - lr * (m[p][i] / bc1) / ((v[p][i] / bc2).sqrt() + cfg.eps);
            }
        }
    }
    for (p, name) in ["decayed", "plain"].iter().enumerate() {
        let got = opt.params[*name].var.as_tensor().to_vec1::<f32>().unwrap();
        let worst = got
            .iter()
            .zip(&w[p])
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "{name}: worst |w - reference| = {worst:e}");
        let moved = got.iter().zip(&w0).filter(|(a, b)| a != b).count();
        assert_eq!(moved, n, "{name}: every weight was updated");
    }
}

/// The fused differentiable RMSNorm (tracked f32 input, frozen weight) against the composed
/// formula written out here, forward and input gradient.
#[test]
fn fused_rms_norm_forward_and_input_gradient_match_the_composed_ops() {
    let (rows, h, eps) = (37, 96, 1e-6);
    let x = Var::from_tensor(&randn(&[rows / 37, 37, h], 50, 2.0)).unwrap();
    let w = randn(&[h], 51, 1.0);
    let r = randn(&[rows / 37, 37, h], 52, 1.0);
    let fused = ops::rms_norm(x.as_tensor(), &w, eps, ForwardMode::Differentiable).unwrap();
    let gf = (&fused * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let xt = x.as_tensor();
    let ms = xt.sqr().unwrap().mean_keepdim(2).unwrap();
    let composed = xt
        .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w)
        .unwrap();
    let gc = (&composed * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(max_diff(&fused, &composed) < 1e-5);
    let (a, b) = (gf.get(xt).unwrap(), gc.get(xt).unwrap());
    let scale = max_abs(b);
    assert!(
        max_diff(a, b) < 1e-5 * scale.max(1.0),
        "input gradient differs"
    );
    assert!(gf.get(&w).is_none(), "the frozen weight gets no gradient");
}

/// Runs `f` on f32 copies of `inputs` (the fused CPU kernels) and on f64 copies (candle's
/// composed ops, checked against finite differences in tests/gradients.rs), with the loss
/// `sum(f(..) * r)`, and compares outputs and the gradient of every input whose `tracked`
/// entry is true (the fused kernels must give an untracked one none). Tolerances are
/// relative to the largest reference value.
fn fused_vs_f64(what: &str, inputs: &[(Tensor, bool)], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
    let run = |dtype: DType| {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .map(|(x, tracked)| {
                tracked.then(|| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap())
            })
            .collect();
        let xs: Vec<Tensor> = inputs
            .iter()
            .zip(&vars)
            .map(|((x, _), v)| match v {
                Some(v) => v.as_tensor().clone(),
                None => x.to_dtype(dtype).unwrap(),
            })
            .collect();
        let y = f(&xs);
        let r = randn(y.dims(), 77, 1.0).to_dtype(dtype).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Option<Tensor>> = xs.iter().map(|x| grads.get(x).cloned()).collect();
        (y, gs)
    };
    let (y32, g32) = run(DType::F32);
    let (y64, g64) = run(DType::F64);
    assert_eq!(y32.dtype(), DType::F32, "{what}: output dtype");
    let d = max_diff(&y32, &y64) / max_abs(&y64).max(1.0);
    assert!(d < tol, "{what}: output differs by {d:e} (relative)");
    for (i, ((a, b), (_, tracked))) in g32.iter().zip(&g64).zip(inputs).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) if *tracked => {
                let d = max_diff(a, b) / max_abs(b).max(1e-3);
                assert!(
                    d < tol,
                    "{what}: gradient of input {i} differs by {d:e} (relative)"
                );
            }
            // candle's composed ops also compute gradients for untracked operands; the fused
            // kernels must not spend the time.
            (None, _) if !tracked => {}
            _ => panic!("{what}: input {i} (tracked: {tracked}): gradient {a:?} vs {b:?}"),
        }
    }
}

#[test]
fn fused_attention_gradients_match_the_composed_ops_in_f64() {
    if !blas_loaded("fused attention backward") {
        return;
    }
    // The loss reads real tokens only (as the model's, whose padded outputs the resampler
    // masks).
    let (b, nh, nkv, t, hd) = ATTENTION_DIMS;
    let (_, mask) = padded_prompts();
    let valid: Vec<f32> = mask.iter().flatten().map(|&m| f32::from(m)).collect();
    let valid = Tensor::from_vec(valid, (b, t, 1), &Device::Cpu).unwrap();
    let bias = bias(&mask);
    let inputs = [
        (randn(&[b, nh, t, hd], 60, 1.0), true),
        (randn(&[b, nkv, t, hd], 61, 1.0), true),
        (randn(&[b, nkv, t, hd], 62, 1.0), true),
    ];
    fused_vs_f64(
        "attention",
        &inputs,
        |x| {
            let dt = x[0].dtype();
            let bias = bias.to_dtype(dt).unwrap();
            let out =
                ops::attention(&x[0], &x[1], &x[2], &bias, ForwardMode::Differentiable).unwrap();
            out.broadcast_mul(&valid.to_dtype(dt).unwrap()).unwrap()
        },
        1e-5,
    );
}

#[test]
fn fused_rope_with_transpose_matches_the_composed_ops_in_f64() {
    let (b, t, h, d) = (2, 7, 3, 16);
    let angles = randn(&[t, d / 2], 63, 2.0);
    let inputs = [(randn(&[b, t, h, d], 64, 1.0), true)];
    fused_vs_f64(
        "rope",
        &inputs,
        |x| {
            let dt = x[0].dtype();
            let (cos, sin) = (
                angles.cos().unwrap().to_dtype(dt).unwrap(),
                angles.sin().unwrap().to_dtype(dt).unwrap(),
            );
            let y = ops::rope_heads(&x[0], &cos, &sin, ForwardMode::Differentiable).unwrap();
            assert_eq!(y.dims(), [b, h, t, d]);
            y
        },
        1e-6,
    );
}

#[test]
fn fused_silu_mul_gradients_match_the_composed_ops_in_f64() {
    for tracked in [(true, true), (true, false), (false, true)] {
        let inputs = [
            (randn(&[5, 40_000], 65, 3.0), tracked.0),
            (randn(&[5, 40_000], 66, 1.0), tracked.1),
        ];
        fused_vs_f64(
            "silu_mul",
            &inputs,
            |x| ops::silu_mul(&x[0], &x[1]).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn trainable_linear_on_blas_matches_the_composed_ops_in_f64() {
    if !blas_loaded("trainable linear") {
        return;
    }
    // LoRA-like (rank 16), resampler-like (rank-3 input), and a frozen input.
    for (shape_x, out, tracked) in [
        (vec![154, 96], 16, (true, true)),
        (vec![2, 77, 64], 200, (true, true)),
        (vec![2, 77, 64], 48, (false, true)),
    ] {
        let inp = *shape_x.last().unwrap();
        let inputs = [
            (randn(&shape_x, 67, 1.0), tracked.0),
            (randn(&[out, inp], 68, 0.2), tracked.1),
        ];
        fused_vs_f64(
            "linear",
            &inputs,
            |x| ops::matmul_t(&x[0], &x[1]).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn frozen_linear_with_and_without_lora_on_blas_matches_the_composed_ops_in_f64() {
    if !blas_loaded("frozen linear (+ LoRA)") {
        return;
    }
    // Sizes that split every product over the cores: by columns, and by rows where a
    // LoRA-rank side leaves too few columns (x a.T, g b, g.T h with g transposed).
    let w = randn(&[600, 256], 70, 0.1);
    let frozen = [(randn(&[2, 77, 256], 71, 1.0), true), (w.clone(), false)];
    fused_vs_f64(
        "frozen linear",
        &frozen,
        |x| ops::frozen_linear(&x[0], &x[1]).unwrap(),
        1e-5,
    );
    // The first decoder layer's input is not tracked: only the LoRA factors get gradients.
    for x_tracked in [true, false] {
        let inputs = [
            (randn(&[2, 77, 256], 72, 1.0), x_tracked),
            (w.clone(), false),
            (randn(&[8, 256], 73, 0.1), true),
            (randn(&[600, 8], 74, 0.3), true),
        ];
        fused_vs_f64(
            "frozen linear + LoRA",
            &inputs,
            |x| {
                let lin = LoraLinear {
                    weight: x[1].clone(),
                    lora: Some((
                        LoraPair {
                            a: x[2].clone(),
                            b: x[3].clone(),
                        },
                        2.0,
                    )),
                };
                lin.forward(&x[0], ForwardMode::Differentiable).unwrap()
            },
            1e-5,
        );
    }
}

#[test]
fn fused_layer_norm_gradients_match_the_composed_ops_in_f64() {
    for x_tracked in [true, false] {
        let inputs = [
            (randn(&[2, 77, 96], 80, 2.0), x_tracked),
            ((randn(&[96], 81, 0.2) + 1.0).unwrap(), true),
            (randn(&[96], 82, 0.2), true),
        ];
        fused_vs_f64(
            "layer_norm",
            &inputs,
            |x| ops::layer_norm(&x[0], &x[1], &x[2], 1e-5, ForwardMode::Differentiable).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn fused_exact_gelu_matches_the_composed_ops_in_f64() {
    let inputs = [(randn(&[5, 40_000], 83, 3.0), true)];
    fused_vs_f64("gelu_erf", &inputs, |x| ops::gelu_erf(&x[0]).unwrap(), 1e-6);
}

#[test]
fn trainable_linear_with_bias_on_blas_matches_the_composed_ops_in_f64() {
    if !blas_loaded("trainable linear + bias") {
        return;
    }
    let inputs = [
        (randn(&[2, 77, 64], 84, 1.0), true),
        (randn(&[300, 64], 85, 0.2), true),
        (randn(&[300], 86, 0.5), true),
    ];
    fused_vs_f64(
        "linear + bias",
        &inputs,
        |x| ops::linear(&x[0], &x[1], Some(&x[2])).unwrap(),
        1e-5,
    );
}
