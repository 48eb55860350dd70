//! The frozen SDXL UNet (`src/unet/`) against diffusers' `UNet2DConditionModel`
//! (`tests/fixtures/unet/`, made by `tests/reference/make_unet_fixtures.py`), its gradients
//! against torch autograd and central finite differences, its kernels (`ops::frozen_conv2d`,
//! `ops::full_attention`, `ops::group_norm`, `ops::geglu`) against candle's composed ops, and its errors.
//!
//! Without a system BLAS the kernel tests only exercise the fallbacks, unless
//! `QWENCLIP_REQUIRE_BLAS` is set: then a missing BLAS fails them.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use qwenclip::dev::tiny::unet::{random_unet, unet_shape, write_unet, UNetFileLayout};
use qwenclip::ops::{self, blas, Conv2dParams};
use qwenclip::rng::Rng;
use qwenclip::unet::{UNet, UNetConditioning, UNetConfig, UNetOrigin};
use qwenclip::ForwardMode;

const D: ForwardMode = ForwardMode::Differentiable;
const F: ForwardMode = ForwardMode::Fast;

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/unet")
}

fn unet_dir() -> PathBuf {
    fixtures().join("diffusers/unet")
}

fn single_file() -> PathBuf {
    fixtures().join("sdxl_single.safetensors")
}

fn expected() -> HashMap<String, Tensor> {
    load(&fixtures().join("expected.safetensors"))
}

fn blas_loaded(what: &str) -> bool {
    if blas::get().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("QWENCLIP_REQUIRE_BLAS").is_none(),
        "{what}: QWENCLIP_REQUIRE_BLAS is set but no system BLAS was loaded"
    );
    eprintln!("{what}: no system BLAS; only the fallbacks are exercised");
    false
}

/// The inputs of fixture case `i` in `dtype`.
struct Case {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    pooled: Tensor,
    time_ids: Tensor,
    out: Tensor,
}

fn case(e: &HashMap<String, Tensor>, i: usize, dtype: DType) -> Case {
    let t = |k: &str| e[&format!("case{i}.{k}")].to_dtype(dtype).unwrap();
    Case {
        sample: t("sample"),
        timesteps: t("timesteps"),
        context: t("encoder_hidden_states"),
        pooled: t("text_embeds"),
        time_ids: t("time_ids"),
        out: t("out"),
    }
}

fn cases(e: &HashMap<String, Tensor>) -> usize {
    (0..)
        .take_while(|i| e.contains_key(&format!("case{i}.out")))
        .count()
}

fn run(unet: &UNet, c: &Case, path: ForwardMode) -> Tensor {
    unet.forward(
        &c.sample,
        &c.timesteps,
        &UNetConditioning {
            encoder_hidden_states: &c.context,
            text_embeds: &c.pooled,
            time_ids: &c.time_ids,
        },
        path,
    )
    .unwrap()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            msg.contains(p),
            "error message {msg:?} should mention {p:?}"
        );
    }
}

fn fixture_config() -> UNetConfig {
    UNetConfig::from_file(&unet_dir().join("config.json")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Parity with diffusers
// ---------------------------------------------------------------------------------------------

/// Every case within 1e-4 of diffusers' float64 output, on both paths.
fn assert_parity(unet: &UNet, what: &str) -> Vec<Tensor> {
    let e = expected();
    assert!(cases(&e) >= 4);
    (0..cases(&e))
        .map(|i| {
            let c = case(&e, i, DType::F32);
            let fast = run(unet, &c, F);
            assert_close(
                &format!("{what} case {i} {:?} fast", c.sample.dims()),
                &fast,
                &c.out,
                1e-4,
            );
            let diff = run(unet, &c, D);
            assert_close(
                &format!("{what} case {i} differentiable"),
                &diff,
                &c.out,
                1e-4,
            );
            fast
        })
        .collect()
}

#[test]
fn matches_diffusers_loaded_from_the_diffusers_folder() {
    let unet = UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(unet.origin(), &UNetOrigin::Diffusers(unet_dir()));
    assert_eq!(unet.config(), &fixture_config());
    assert_parity(&unet, "diffusers folder");
    // A pipeline folder (holding unet/) loads the same.
    let from_root = UNet::load(&fixtures().join("diffusers"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(from_root.origin(), &UNetOrigin::Diffusers(unet_dir()));
}

#[test]
fn matches_diffusers_loaded_from_the_single_file() {
    let cfg = fixture_config();
    let unet = UNet::load_with_config(&single_file(), &cfg, DType::F32, &Device::Cpu).unwrap();
    assert!(
        matches!(unet.origin(), UNetOrigin::SingleFile { prefix, .. } if prefix == "model.diffusion_model.")
    );
    let single = assert_parity(&unet, "single file");
    let folder = UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap();
    let e = expected();
    for (i, s) in single.iter().enumerate() {
        let f = run(&folder, &case(&e, i, DType::F32), F);
        assert_eq!(max_diff(s, &f), 0.0, "case {i}: same weights, same output");
    }
}

#[test]
fn single_file_config_is_read_off_its_shapes() {
    // A file SDXL's rules describe (64-wide heads, 32 groups, 256-wide size ids), written in
    // the LDM layout without a config: loading it must find the same architecture.
    let mut cfg = unet_shape("tiny").unwrap();
    cfg.block_out_channels = vec![32, 64, 128];
    cfg.attention_head_dim = qwenclip::unet::PerBlock::Each(vec![1, 1, 2]);
    cfg.norm_num_groups = Some(32);
    cfg.transformer_layers_per_block = qwenclip::unet::PerBlock::Each(vec![1, 2, 1]);
    cfg.addition_time_embed_dim = Some(256);
    cfg.projection_class_embeddings_input_dim = Some(20 + 6 * 256);
    cfg.cross_attention_dim = qwenclip::unet::PerBlock::One(40);
    let dir = scratch("unet-inferred");
    let path = dir.join("model.safetensors");
    write_unet(&cfg, &path, UNetFileLayout::SingleFile, DType::F16, 3).unwrap();
    let unet = UNet::load(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(unet.config(), &cfg);
    // The tiny fixture's heads and groups are not SDXL's: its single file needs its config.
    let err = UNet::load(&single_file(), DType::F32, &Device::Cpu)
        .err()
        .expect("the tiny single file cannot be inferred")
        .to_string();
    assert_mentions(&err, &["sdxl_single.safetensors", "config.json"]);
}

/// Copies the fixture folder's tensors (diffusers names) out, in f32.
fn fixture_tensors() -> HashMap<String, Tensor> {
    load(&unet_dir().join("diffusion_pytorch_model.fp16.safetensors"))
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    qwenclip::formats::save_atomic(tensors, None, path).unwrap();
}

#[test]
fn sharded_float32_and_bfloat16_folders_load() {
    let e = expected();
    let c = case(&e, 2, DType::F32);
    let reference = run(
        &UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap(),
        &c,
        F,
    );
    let all = fixture_tensors();

    // Two f32 shards behind diffusers' index.
    let dir = scratch("unet-sharded");
    std::fs::copy(unet_dir().join("config.json"), dir.join("config.json")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> =
            part.iter().map(|&n| (n.clone(), all[n].clone())).collect();
        save(&shard, &dir.join(&file));
        for n in part {
            weight_map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let sharded = UNet::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&run(&sharded, &c, F), &reference),
        0.0,
        "sharded f32 = fp16 variant"
    );

    // A bf16 variant file: the same as the weights rounded to bf16 in memory.
    let dir = scratch("unet-bf16");
    std::fs::copy(unet_dir().join("config.json"), dir.join("config.json")).unwrap();
    let bf16: HashMap<String, Tensor> = all
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    save(&bf16, &dir.join("diffusion_pytorch_model.bf16.safetensors"));
    let from_file = UNet::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let in_memory = UNet::from_tensors(&fixture_config(), &bf16, DType::F32, &Device::Cpu).unwrap();
    let got = run(&from_file, &c, F);
    assert_eq!(max_diff(&got, &run(&in_memory, &c, F)), 0.0);
    assert!(max_diff(&got, &reference) > 0.0, "bf16 rounding shows");
}

// ---------------------------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------------------------

/// The inputs as tracked variables.
struct Tracked {
    sample: Var,
    context: Var,
    pooled: Var,
}

fn tracked(c: &Case) -> Tracked {
    Tracked {
        sample: Var::from_tensor(&c.sample).unwrap(),
        context: Var::from_tensor(&c.context).unwrap(),
        pooled: Var::from_tensor(&c.pooled).unwrap(),
    }
}

/// `sum(unet(...) * probe)` over the tracked inputs.
fn probe_loss(unet: &UNet, c: &Case, v: &Tracked, probe: &Tensor) -> Tensor {
    let out = unet
        .forward(
            v.sample.as_tensor(),
            &c.timesteps,
            &UNetConditioning {
                encoder_hidden_states: v.context.as_tensor(),
                text_embeds: v.pooled.as_tensor(),
                time_ids: &c.time_ids,
            },
            D,
        )
        .unwrap();
    (out * probe).unwrap().sum_all().unwrap()
}

/// The gradients of the probe loss: `[sample, context, pooled]`. Asserts that the gradient
/// store holds nothing else of size (no weight gradient, no activation gradient): besides the
/// inputs and the probe, only the time embeddings' `[B, T]` rows.
fn input_grads(unet: &UNet, c: &Case, probe: &Tensor) -> [Tensor; 3] {
    let v = tracked(c);
    let grads = probe_loss(unet, c, &v, probe).backward().unwrap();
    let total: usize = grads
        .get_ids()
        .map(|id| grads.get_id(*id).expect("listed").elem_count())
        .sum();
    let inputs: usize = [
        &v.sample,
        &v.context,
        &v.pooled,
        &Var::from_tensor(probe).unwrap(),
    ]
    .iter()
    .map(|t| t.elem_count())
    .sum();
    let (_, proj) = unet.config().addition_dims();
    let rows = c.sample.dim(0).unwrap() * (unet.config().time_embed_dim() + proj);
    assert!(
        total - inputs <= rows,
        "the gradient store holds {} elements besides the inputs (weights' or activations' gradients?)",
        total - inputs
    );
    [&v.sample, &v.context, &v.pooled].map(|x| {
        grads
            .get(x.as_tensor())
            .expect("every tracked input gets a gradient")
            .clone()
    })
}

/// `max |got - want| <= rel * max |want|`, computed in f64.
fn assert_rel_close(what: &str, got: &Tensor, want: &Tensor, rel: f64) {
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (got, want) = (f64_of(got), f64_of(want));
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let diff = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        diff <= rel * scale,
        "{what}: max |diff| = {diff:e} > {rel:e} x max |want| ({scale:e})"
    );
    eprintln!("{what}: max |diff| = {diff:e} (max |want| {scale:e})");
}

/// float64 against torch's float64 autograd: the residual (<= 2e-7 relative) is torch's float32
/// `sin`/`cos` of the size ids' large arguments (diffusers computes the sinusoidal embeddings
/// in float32 for every model dtype, and torch's are up to 9e-7 off for arguments ~1344,
/// glibc's 4e-8).
#[test]
fn input_gradients_match_torch_autograd() {
    let e = expected();
    let names = ["sample", "encoder_hidden_states", "text_embeds"];
    let c64 = case(&e, 0, DType::F64);
    let probe64 = e["grad.probe"].to_dtype(DType::F64).unwrap();
    let unet64 = UNet::load(&unet_dir(), DType::F64, &Device::Cpu).unwrap();
    for (g, name) in input_grads(&unet64, &c64, &probe64).iter().zip(names) {
        assert_rel_close(
            &format!("f64 d/d{name}"),
            g,
            &e[&format!("grad.{name}")],
            1e-6,
        );
    }
    // f32 on the fused kernels, recomputing each block in the backward.
    let c32 = case(&e, 0, DType::F32);
    let probe32 = e["grad.probe"].clone();
    let unet32 = UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap();
    assert!(unet32.checkpointing());
    for (g, name) in input_grads(&unet32, &c32, &probe32).iter().zip(names) {
        assert_rel_close(
            &format!("f32 d/d{name}"),
            g,
            &e[&format!("grad.{name}")],
            1e-4,
        );
    }
}

#[test]
fn recomputation_does_not_change_the_gradients() {
    let e = expected();
    let c = case(&e, 2, DType::F32);
    let probe = Tensor::ones_like(&c.out).unwrap();
    let mut unet = UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap();
    let with = input_grads(&unet, &c, &probe);
    unet.set_checkpointing(false);
    let without = input_grads(&unet, &c, &probe);
    for (i, (a, b)) in with.iter().zip(&without).enumerate() {
        assert_rel_close(
            &format!("input {i} with vs without recomputation"),
            a,
            b,
            1e-5,
        );
    }
}

/// Central finite differences of the probe loss on `samples` entries of `var`.
fn check_fd(
    what: &str,
    var: &Var,
    grad: &Tensor,
    loss: &dyn Fn() -> f64,
    samples: usize,
    seed: u64,
) {
    let g = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let base = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = var.as_tensor().dims().to_vec();
    let mut rng = Rng::new(seed);
    for _ in 0..samples {
        let i = rng.below(base.len());
        let eps = 1e-5;
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            loss()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        let err = (g[i] - fd).abs() / fd.abs().max(g[i].abs()).max(1e-6);
        assert!(
            err < 1e-6,
            "{what}[{i}]: autograd {} vs finite difference {fd} (rel err {err:e})",
            g[i]
        );
    }
}

#[test]
fn input_gradients_match_finite_differences() {
    let unet = random_unet(&unet_shape("tiny").unwrap(), 11, DType::F64, &Device::Cpu).unwrap();
    let e = expected();
    let c = case(&e, 1, DType::F64);
    let probe = Tensor::from_vec(
        Rng::new(5).normal_vec(c.out.elem_count(), 1.0),
        c.out.dims(),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(DType::F64)
    .unwrap();
    let v = tracked(&c);
    let grads = probe_loss(&unet, &c, &v, &probe).backward().unwrap();
    let loss = || {
        probe_loss(&unet, &c, &v, &probe)
            .to_scalar::<f64>()
            .unwrap()
    };
    for (name, var, n) in [
        ("context", &v.context, 12),
        ("pooled", &v.pooled, 8),
        ("sample", &v.sample, 6),
    ] {
        let g = grads.get(var.as_tensor()).unwrap();
        check_fd(name, var, g, &loss, n, 21);
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels against candle's composed ops
// ---------------------------------------------------------------------------------------------

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).normal_vec(n, 1.0), shape, &Device::Cpu).unwrap()
}

/// Forward and input gradient of `f` on f32 `x` against `reference` on the same input in f64
/// (candle's own ops, with autograd).
fn against_reference(
    what: &str,
    x: &Tensor,
    f: &dyn Fn(&Tensor) -> Tensor,
    reference: &dyn Fn(&Tensor) -> Tensor,
    tol: f64,
) {
    let probe = randn(f(x).dims(), 99);
    let grad = |g: &dyn Fn(&Tensor) -> Tensor, x: &Tensor| {
        let v = Var::from_tensor(x).unwrap();
        let y = g(v.as_tensor());
        let p = probe.to_dtype(y.dtype()).unwrap();
        let grads = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(v.as_tensor()).expect("input gradient").clone())
    };
    let (y, dx) = grad(f, x);
    let (y_ref, dx_ref) = grad(reference, &x.to_dtype(DType::F64).unwrap());
    assert_rel_close(&format!("{what} forward"), &y, &y_ref, tol);
    assert_rel_close(&format!("{what} input gradient"), &dx, &dx_ref, tol);
}

#[test]
fn frozen_conv2d_matches_candle_and_gets_no_kernel_gradient() {
    blas_loaded("frozen_conv2d");
    // (batch, c_in, c_out, h, w, kernel, stride, padding): SDXL's 3x3, its stride-2
    // downsampler on even and odd sizes, the 1x1 shortcut, a non-square image.
    let shapes = [
        (2, 5, 7, 9, 11, 3, 1, 1),
        (1, 6, 6, 10, 10, 3, 2, 1),
        (2, 4, 3, 7, 9, 3, 2, 1),
        (2, 6, 4, 5, 8, 1, 1, 0),
        (1, 3, 5, 70, 65, 3, 1, 1),
    ];
    for (i, &(b, ci, co, h, w, k, s, p)) in shapes.iter().enumerate() {
        let x = randn(&[b, ci, h, w], i as u64);
        let kernel = (randn(&[co, ci, k, k], 10 + i as u64) * 0.3).unwrap();
        let bias = randn(&[co], 20 + i as u64);
        let params = Conv2dParams {
            stride: s,
            padding: p,
        };
        let ours = |x: &Tensor| {
            let (kw, bw) = (
                kernel.to_dtype(x.dtype()).unwrap(),
                bias.to_dtype(x.dtype()).unwrap(),
            );
            ops::frozen_conv2d(x, &kw, Some(&bw), params).unwrap()
        };
        let candle = |x: &Tensor| {
            let kw = kernel.to_dtype(DType::F64).unwrap();
            let bw = bias
                .to_dtype(DType::F64)
                .unwrap()
                .reshape((1, co, 1, 1))
                .unwrap();
            x.conv2d(&kw, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bw)
                .unwrap()
        };
        let what = format!("conv {k}x{k}/{s} [{b},{ci},{h},{w}]");
        against_reference(&what, &x, &ours, &candle, 1e-5);
        // The f64 path (candle's forward, conv_transpose2d backward) too.
        let x64 = x.to_dtype(DType::F64).unwrap();
        against_reference(&format!("{what} f64"), &x64, &ours, &candle, 1e-12);
    }
    // The kernel is never part of the graph: a tracked kernel still gets no gradient.
    let x = Var::from_tensor(&randn(&[1, 2, 5, 5], 1)).unwrap();
    let kernel = Var::from_tensor(&randn(&[3, 2, 3, 3], 2)).unwrap();
    let params = Conv2dParams {
        stride: 1,
        padding: 1,
    };
    let y = ops::frozen_conv2d(x.as_tensor(), kernel.as_tensor(), None, params).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(
        grads.get(kernel.as_tensor()).is_none(),
        "frozen kernel got a gradient"
    );
}

#[test]
fn full_attention_matches_the_composed_softmax() {
    blas_loaded("full_attention");
    // (batch, query length, key length, heads, head width): self-attention over 8x8
    // pixels, cross-attention over 77 and over 5 tokens, a query count past one block.
    for (i, &(b, tq, tk, heads, hd)) in [(2, 64, 64, 2, 8), (2, 64, 77, 4, 16), (1, 150, 5, 3, 10)]
        .iter()
        .enumerate()
    {
        let seed = 100 * i as u64;
        let q = randn(&[b, tq, heads * hd], seed);
        let k = randn(&[b, tk, heads * hd], seed + 1);
        let v = randn(&[b, tk, heads * hd], seed + 2);
        let composed = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let split = |t: &Tensor| {
                let n = t.dim(1).unwrap();
                t.reshape((b, n, heads, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let s =
                (split(q).matmul(&split(k).t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
            p.matmul(&split(v).contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, tq, heads * hd))
                .unwrap()
        };
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let what = format!("attention {tq}x{tk}, {heads} heads of {hd}");
        // One argument at a time is the variable, so each of dq, dk, dv is checked.
        against_reference(
            &format!("{what} d/dq"),
            &q,
            &|x| ops::full_attention(x, &k, &v, heads, D).unwrap(),
            &|x| composed(x, &to64(&k), &to64(&v)),
            1e-5,
        );
        against_reference(
            &format!("{what} d/dk"),
            &k,
            &|x| ops::full_attention(&q, x, &v, heads, D).unwrap(),
            &|x| composed(&to64(&q), x, &to64(&v)),
            1e-5,
        );
        against_reference(
            &format!("{what} d/dv"),
            &v,
            &|x| ops::full_attention(&q, &k, x, heads, D).unwrap(),
            &|x| composed(&to64(&q), &to64(&k), x),
            1e-5,
        );
    }
}

#[test]
fn fused_group_norm_matches_the_composed_one() {
    for silu in [false, true] {
        for (i, dims) in [[2usize, 12, 5, 7], [1, 8, 16, 16]].iter().enumerate() {
            let x = randn(dims, i as u64).affine(3.0, 1.0).unwrap();
            let w = randn(&[dims[1]], 7).affine(0.2, 1.0).unwrap();
            let b = (randn(&[dims[1]], 8) * 0.2).unwrap();
            let ours = |x: &Tensor| {
                let (w, b) = (
                    w.to_dtype(x.dtype()).unwrap(),
                    b.to_dtype(x.dtype()).unwrap(),
                );
                ops::group_norm(x, &w, &b, 4, 1e-5, silu).unwrap()
            };
            let candle = |x: &Tensor| {
                let gn = candle_nn::GroupNorm::new(
                    w.to_dtype(DType::F64).unwrap(),
                    b.to_dtype(DType::F64).unwrap(),
                    dims[1],
                    4,
                    1e-5,
                )
                .unwrap();
                let y = candle_core::Module::forward(&gn, x).unwrap();
                if silu {
                    candle_nn::ops::silu(&y).unwrap()
                } else {
                    y
                }
            };
            against_reference(
                &format!("group norm {dims:?} silu={silu}"),
                &x,
                &ours,
                &candle,
                1e-5,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn load_err(path: &Path) -> String {
    match UNet::load(path, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

fn copy_folder(name: &str) -> PathBuf {
    let d = scratch(name);
    for f in ["config.json", "diffusion_pytorch_model.fp16.safetensors"] {
        std::fs::copy(unet_dir().join(f), d.join(f)).unwrap();
    }
    d
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn unets_of_other_families_are_named() {
    // An SD 1.5 config: no text_time addition embedding, CLIP-L's 768-wide conditioning.
    let d = copy_folder("unet-sd15-config");
    edit_config(&d, |v| {
        v["addition_embed_type"] = serde_json::Value::Null;
        v["cross_attention_dim"] = serde_json::json!(768);
    });
    assert_mentions(
        &load_err(&d),
        &["config.json", "addition_embed_type", "SD 1.x"],
    );
    // An SD 1.5 single file: LDM layout, no label_emb, 768-wide cross-attention.
    let d = scratch("unet-sd15-single");
    let p = d.join("sd15.safetensors");
    let t = |s: &[usize]| Tensor::zeros(s, DType::F16, &Device::Cpu).unwrap();
    let pre = "model.diffusion_model.";
    save(
        &HashMap::from([
            (format!("{pre}input_blocks.0.0.weight"), t(&[320, 4, 3, 3])),
            (format!("{pre}time_embed.0.weight"), t(&[1280, 320])),
            (
                format!("{pre}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"),
                t(&[320, 768]),
            ),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
                t(&[768]),
            ),
        ]),
        &p,
    );
    assert_mentions(
        &load_err(&p),
        &[
            "sd15.safetensors",
            "label_emb",
            "not an SDXL-family UNet",
            "SD 1.x",
        ],
    );
    // SD3 and Flux single files.
    for (name, key, family) in [
        (
            "sd3",
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "SD3",
        ),
        ("flux", "double_blocks.0.img_attn.qkv.weight", "Flux"),
    ] {
        let p = d.join(format!("{name}.safetensors"));
        save(&HashMap::from([(key.to_string(), t(&[3, 2]))]), &p);
        assert_mentions(
            &load_err(&p),
            &[
                &format!("{name}.safetensors"),
                "not a single-file SDXL checkpoint",
                family,
            ],
        );
    }
    // A diffusers SD3 transformer config, and an SD3/Flux pipeline folder.
    let d = copy_folder("unet-sd3-config");
    edit_config(&d, |v| {
        v["_class_name"] = serde_json::json!("SD3Transformer2DModel")
    });
    assert_mentions(
        &load_err(&d),
        &["config.json", "SD3Transformer2DModel", "SD3"],
    );
    let d = scratch("unet-sd3-pipeline");
    std::fs::create_dir_all(d.join("transformer")).unwrap();
    assert_mentions(&load_err(&d), &["unet-sd3-pipeline", "SD3 or Flux"]);
}

#[test]
fn missing_and_misshapen_tensors_name_file_and_tensor() {
    let d = copy_folder("unet-missing");
    let file = d.join("diffusion_pytorch_model.fp16.safetensors");
    let mut all = load(&file);
    let gone = "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v.weight";
    assert!(all.remove(gone).is_some());
    save(&all, &file);
    assert_mentions(&load_err(&d), &["unet-missing", gone, "missing"]);

    // The fixture's single file under a config with SDXL's 2048-wide cross-attention.
    let mut cfg = fixture_config();
    cfg.cross_attention_dim = qwenclip::unet::PerBlock::One(2048);
    let err = UNet::load_with_config(&single_file(), &cfg, DType::F32, &Device::Cpu)
        .err()
        .expect("shapes do not fit")
        .to_string();
    assert_mentions(
        &err,
        &[
            "sdxl_single.safetensors",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            "[16, 24]",
            "[16, 2048]",
        ],
    );
    // No weights next to the config.
    let d = copy_folder("unet-no-weights");
    std::fs::remove_file(d.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    assert_mentions(
        &load_err(&d),
        &["unet-no-weights", "diffusion_pytorch_model.safetensors"],
    );
}

#[test]
fn conditioning_that_does_not_fit_is_refused() {
    let unet = UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap();
    let e = expected();
    let c = case(&e, 0, DType::F32);
    let err = |ctx: &Tensor, pooled: &Tensor, ids: &Tensor, t: &Tensor| {
        let cond = UNetConditioning {
            encoder_hidden_states: ctx,
            text_embeds: pooled,
            time_ids: ids,
        };
        unet.forward(&c.sample, t, &cond, D)
            .expect_err("refused")
            .to_string()
    };
    let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    assert_mentions(
        &err(&zeros(&[2, 77, 768]), &c.pooled, &c.time_ids, &c.timesteps),
        &["encoder_hidden_states", "768", "cross-attention takes 24"],
    );
    assert_mentions(
        &err(&c.context, &zeros(&[2, 1280]), &c.time_ids, &c.timesteps),
        &["text_embeds", "[2, 1280]", "[2, 20]"],
    );
    assert_mentions(
        &err(&c.context, &c.pooled, &zeros(&[2, 5]), &c.timesteps),
        &["time_ids", "[2, 5]", "[2, 6]"],
    );
    assert_mentions(
        &err(&c.context, &c.pooled, &c.time_ids, &zeros(&[3])),
        &["timesteps", "[3]", "expected [2]"],
    );
    assert_mentions(
        &err(&zeros(&[1, 77, 24]), &c.pooled, &c.time_ids, &c.timesteps),
        &[
            "encoder_hidden_states",
            "[1, 77, 24]",
            "expected [2, S, 24]",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Measurements (not run by default): `cargo test --release --test unet -- --ignored --nocapture`
// ---------------------------------------------------------------------------------------------

/// `(current, peak)` resident set size of this process in MiB; `reset` first restarts the
/// peak from the current size (Linux `clear_refs` 5).
fn rss_mib(reset: bool) -> (f64, f64) {
    if reset {
        std::fs::write("/proc/self/clear_refs", "5").expect("Linux /proc/self/clear_refs");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap()
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn secs(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// CPU seconds (user + system) this process has used: on a shared machine a steadier
/// measure than the wall clock.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields[i].parse::<f64>().unwrap();
    (ticks(11) + ticks(12)) / 100.0
}

/// SDXL's shape with random weights (f32, 10.3 GB) at 256 px: latents `[1, 4, 32, 32]`, 77
/// conditioning tokens, gradients for the conditioning and the pooled vector. Prints the
/// time of a fast forward and of forward + backward with and without recomputation, and
/// the peak resident memory each adds to the loaded model.
#[test]
#[ignore = "needs ~12 GB of memory and minutes of CPU"]
fn sdxl_shaped_forward_backward_memory_and_time() {
    let t0 = std::time::Instant::now();
    let mut unet = random_unet(&UNetConfig::sdxl(), 1, DType::F32, &Device::Cpu).unwrap();
    let (base, _) = rss_mib(true);
    eprintln!(
        "SDXL-shaped UNet: random f32 weights in {:.1} s, RSS {base:.0} MiB",
        secs(t0)
    );
    let sample = randn(&[1, 4, 32, 32], 1);
    let timesteps = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let context = randn(&[1, 77, 2048], 2);
    let pooled = randn(&[1, 1280], 3);
    let time_ids = Tensor::new(&[[256f32, 256., 0., 0., 256., 256.]], &Device::Cpu).unwrap();
    let cond = UNetConditioning {
        encoder_hidden_states: &context,
        text_embeds: &pooled,
        time_ids: &time_ids,
    };
    let (t, c) = (std::time::Instant::now(), cpu_secs());
    let out = unet.forward(&sample, &timesteps, &cond, F).unwrap();
    let (_, peak) = rss_mib(false);
    eprintln!(
        "fast forward: {:.2} s ({:.1} CPU-s), peak +{:.0} MiB, |out| max {:.3}",
        secs(t),
        cpu_secs() - c,
        peak - base,
        max_abs(&out)
    );
    for checkpointing in [true, false] {
        unet.set_checkpointing(checkpointing);
        let (ctx, pool) = (
            Var::from_tensor(&context).unwrap(),
            Var::from_tensor(&pooled).unwrap(),
        );
        let cond = UNetConditioning {
            encoder_hidden_states: ctx.as_tensor(),
            text_embeds: pool.as_tensor(),
            time_ids: &time_ids,
        };
        let (before, _) = rss_mib(true);
        let (t, c) = (std::time::Instant::now(), cpu_secs());
        let out = unet.forward(&sample, &timesteps, &cond, D).unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let (fwd, fwd_cpu) = (secs(t), cpu_secs() - c);
        let (after_fwd, _) = rss_mib(false);
        let (t, c) = (std::time::Instant::now(), cpu_secs());
        let grads = loss.backward().unwrap();
        let (bwd, bwd_cpu) = (secs(t), cpu_secs() - c);
        let (_, peak) = rss_mib(false);
        let g = grads.get(ctx.as_tensor()).unwrap();
        eprintln!(
            "recomputation {checkpointing}: forward {fwd:.2} s ({fwd_cpu:.1} CPU-s; graph kept: +{:.0} MiB), backward {bwd:.2} s ({bwd_cpu:.1} CPU-s), peak +{:.0} MiB over the model, |d/dcontext| max {:.3e}",
            after_fwd - before,
            peak - before,
            max_abs(g)
        );
        drop((grads, loss, out));
    }
}

/// The fused kernels against candle's generic ones on SDXL's shapes at 256 px.
#[test]
#[ignore = "a benchmark"]
fn kernels_against_candle_on_sdxl_shapes() {
    if !blas_loaded("kernel benchmark") {
        return;
    }
    let time = |f: &dyn Fn() -> Tensor| {
        f();
        let t = std::time::Instant::now();
        for _ in 0..3 {
            f();
        }
        secs(t) / 3.0
    };
    let params = Conv2dParams {
        stride: 1,
        padding: 1,
    };
    for (c, hw) in [(320, 32), (640, 16), (1280, 8)] {
        let x = randn(&[1, c, hw, hw], 1);
        let w = (randn(&[c, c, 3, 3], 2) * 0.01).unwrap();
        let ours = time(&|| ops::frozen_conv2d(&x, &w, None, params).unwrap());
        let candle = time(&|| x.conv2d(&w, 1, 1, 1, 1).unwrap());
        let (xv, gy) = (Var::from_tensor(&x).unwrap(), randn(&[1, c, hw, hw], 3));
        let ours_bwd = time(&|| {
            let y = ops::frozen_conv2d(xv.as_tensor(), &w, None, params).unwrap();
            let g = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(xv.as_tensor()).unwrap().clone()
        });
        let candle_bwd = time(&|| {
            let y = xv.as_tensor().conv2d(&w, 1, 1, 1, 1).unwrap();
            let g = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(xv.as_tensor()).unwrap().clone()
        });
        eprintln!(
            "conv 3x3 {c}->{c} at {hw}x{hw}: forward {:.1} ms (candle {:.1}), forward+backward {:.1} ms (candle {:.1})",
            ours * 1e3,
            candle * 1e3,
            ours_bwd * 1e3,
            candle_bwd * 1e3
        );
    }
    for (c, heads, tq, tk) in [(640, 10, 256, 256), (640, 10, 256, 77), (1280, 20, 64, 64)] {
        let q = randn(&[1, tq, c], 1);
        let k = randn(&[1, tk, c], 2);
        let v = randn(&[1, tk, c], 3);
        let ours = time(&|| ops::full_attention(&q, &k, &v, heads, D).unwrap());
        let composed = time(&|| {
            let hd = c / heads;
            let split = |t: &Tensor, n| {
                t.reshape((1, n, heads, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let s = (split(&q, tq).matmul(&split(&k, tk).t().unwrap()).unwrap()
                / (hd as f64).sqrt())
            .unwrap();
            candle_nn::ops::softmax(&s, candle_core::D::Minus1)
                .unwrap()
                .matmul(&split(&v, tk))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((1, tq, c))
                .unwrap()
        });
        eprintln!(
            "attention {tq}x{tk}, {heads} heads: {:.2} ms (composed candle {:.2})",
            ours * 1e3,
            composed * 1e3
        );
    }
}

#[test]
fn fused_geglu_matches_the_composed_one() {
    let p = randn(&[2, 7, 2 * 40], 3).affine(2.0, 0.0).unwrap();
    let composed = |p: &Tensor| {
        let h = p.narrow(candle_core::D::Minus1, 0, 40).unwrap();
        let g = p.narrow(candle_core::D::Minus1, 40, 40).unwrap();
        // GELU from erf: candle's gelu_erf backward rounds 1/sqrt(2 pi).
        let erf = (&g * std::f64::consts::FRAC_1_SQRT_2)
            .unwrap()
            .erf()
            .unwrap();
        let gelu = ((erf + 1.0).unwrap() * &g).unwrap() * 0.5;
        (h * gelu.unwrap()).unwrap()
    };
    against_reference("geglu", &p, &|p| ops::geglu(p).unwrap(), &composed, 1e-5);
}

#[test]
fn the_fast_path_records_no_graph() {
    let unet = UNet::load(&unet_dir(), DType::F32, &Device::Cpu).unwrap();
    let e = expected();
    let c = case(&e, 1, DType::F32);
    let v = tracked(&c);
    let out = unet
        .forward(
            v.sample.as_tensor(),
            &c.timesteps,
            &UNetConditioning {
                encoder_hidden_states: v.context.as_tensor(),
                text_embeds: v.pooled.as_tensor(),
                time_ids: &c.time_ids,
            },
            F,
        )
        .unwrap();
    assert!(
        !out.track_op(),
        "fast path: no partial graph through kernels without backward"
    );
    assert_close("fast path with tracked inputs", &out, &c.out, 1e-4);
}

#[test]
fn frozen_conv2d_input_gradient_matches_finite_differences() {
    blas_loaded("frozen_conv2d finite differences");
    // A convolution is linear in its input: central differences of the f64 forward are exact
    // up to rounding, for the BLAS f32 kernel's gradient and the f64 fallback's alike.
    for (k, s, p) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
        let x = randn(&[2, 3, 7, 6], 1);
        let kernel = randn(&[4, 3, k, k], 2);
        let bias = randn(&[4], 3);
        let params = Conv2dParams {
            stride: s,
            padding: p,
        };
        let probe = randn(
            ops::frozen_conv2d(&x, &kernel, Some(&bias), params)
                .unwrap()
                .dims(),
            4,
        );
        let grad_of = |dtype: DType| {
            let v = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let (kw, bw, pr) = [&kernel, &bias, &probe]
                .map(|t| t.to_dtype(dtype).unwrap())
                .into();
            let y = ops::frozen_conv2d(v.as_tensor(), &kw, Some(&bw), params).unwrap();
            let g = (y * pr).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(v.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (g32, g64) = (grad_of(DType::F32), grad_of(DType::F64));
        let x64 = x
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let [kw, bw, pr] = [&kernel, &bias, &probe].map(|t| t.to_dtype(DType::F64).unwrap());
        let loss = |v: &[f64]| {
            let xt = Tensor::from_vec(v.to_vec(), x.dims(), &Device::Cpu).unwrap();
            let y = ops::frozen_conv2d(&xt, &kw, Some(&bw), params).unwrap();
            (y * &pr)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            let i = rng.below(x64.len());
            let (mut plus, mut minus) = (x64.clone(), x64.clone());
            plus[i] += 1e-3;
            minus[i] -= 1e-3;
            let fd = (loss(&plus) - loss(&minus)) / 2e-3;
            let scale = fd.abs().max(1.0);
            assert!(
                (g64[i] - fd).abs() < 1e-9 * scale,
                "{k}x{k}/{s} f64 d/dx[{i}]: {} vs {fd}",
                g64[i]
            );
            assert!(
                (g32[i] - fd).abs() < 1e-5 * scale,
                "{k}x{k}/{s} f32 d/dx[{i}]: {} vs {fd}",
                g32[i]
            );
        }
    }
}
