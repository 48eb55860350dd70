//! Every op on the training path against central finite differences, in f64.
//! A kernel that silently records no gradient (see shared/notes/candle.md) fails here.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use qwenclip::llm::Qwen3;
use qwenclip::lora::{Lora, LoraLinear, LoraPair};
use qwenclip::ops;
use qwenclip::resampler::{Resampler, ResamplerConfig};
use qwenclip::rng::Rng;
use qwenclip::{ForwardMode, LoraMode};

const D: ForwardMode = ForwardMode::Differentiable;

fn randn(shape: &[usize], rng: &mut Rng, std: f64) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = rng.normal_vec(n, std).into_iter().map(f64::from).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A scalar that depends on every output element with a distinct weight.
fn project(y: &Tensor, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let r = randn(y.dims(), &mut rng, 1.0);
    (y * r).unwrap().sum_all().unwrap()
}

/// Compares autograd with central differences on `samples` entries of each var.
fn check(what: &str, vars: &[(&str, &Var)], loss: impl Fn() -> Tensor, samples: usize) {
    let grads = loss().backward().unwrap();
    let mut rng = Rng::new(99);
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: `{name}` received no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().dims().to_vec();
        for _ in 0..samples {
            let i = rng.below(base.len());
            let eps = 1e-5;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (g[i] - fd).abs() / fd.abs().max(g[i].abs()).max(1e-3);
            assert!(
                err < 1e-4,
                "{what}: d/d{name}[{i}] autograd {} vs finite difference {fd} (rel err {err:e})",
                g[i]
            );
        }
    }
}

#[test]
fn rms_norm_gradient() {
    let mut rng = Rng::new(1);
    let x = Var::from_tensor(&randn(&[2, 3, 8], &mut rng, 1.0)).unwrap();
    let w = Var::from_tensor(&(randn(&[8], &mut rng, 0.1) + 1.0).unwrap()).unwrap();
    check(
        "rms_norm",
        &[("x", &x), ("w", &w)],
        || project(&ops::rms_norm(&x, &w, 1e-6, D).unwrap(), 1),
        12,
    );
}

#[test]
fn layer_norm_gradient() {
    let mut rng = Rng::new(2);
    let x = Var::from_tensor(&randn(&[2, 3, 8], &mut rng, 1.0)).unwrap();
    let w = Var::from_tensor(&(randn(&[8], &mut rng, 0.1) + 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(&[8], &mut rng, 0.1)).unwrap();
    check(
        "layer_norm",
        &[("x", &x), ("w", &w), ("b", &b)],
        || project(&ops::layer_norm(&x, &w, &b, 1e-5, D).unwrap(), 2),
        12,
    );
}

#[test]
fn rope_gradient() {
    let mut rng = Rng::new(3);
    let x = Var::from_tensor(&randn(&[1, 2, 5, 8], &mut rng, 1.0)).unwrap();
    let cos = randn(&[5, 4], &mut rng, 1.0).cos().unwrap();
    let sin = randn(&[5, 4], &mut rng, 1.0).sin().unwrap();
    check(
        "rope",
        &[("x", &x)],
        || project(&ops::rope(&x, &cos, &sin, D).unwrap(), 3),
        16,
    );
}

#[test]
fn masked_softmax_gradient() {
    let mut rng = Rng::new(4);
    let x = Var::from_tensor(&randn(&[2, 3, 6], &mut rng, 1.0)).unwrap();
    let mut bias = vec![0f64; 36];
    bias.iter_mut().step_by(4).for_each(|b| *b = ops::MASKED);
    let bias = Tensor::from_vec(bias, (2, 3, 6), &Device::Cpu).unwrap();
    check(
        "masked softmax",
        &[("x", &x)],
        || {
            project(
                &ops::softmax(&(x.as_tensor() + &bias).unwrap(), D).unwrap(),
                4,
            )
        },
        16,
    );
}

#[test]
fn frozen_linear_gives_input_gradient_only() {
    let mut rng = Rng::new(5);
    let x = Var::from_tensor(&randn(&[2, 3, 8], &mut rng, 1.0)).unwrap();
    let w = Var::from_tensor(&randn(&[5, 8], &mut rng, 0.3)).unwrap();
    check(
        "frozen linear",
        &[("x", &x)],
        || project(&ops::frozen_linear(&x, &w).unwrap(), 5),
        16,
    );
    let grads = project(&ops::frozen_linear(&x, &w).unwrap(), 5)
        .backward()
        .unwrap();
    assert!(
        grads.get(w.as_tensor()).is_none(),
        "a frozen weight must not get a gradient"
    );
}

#[test]
fn lora_linear_gradient() {
    let mut rng = Rng::new(6);
    let x = Var::from_tensor(&randn(&[2, 3, 8], &mut rng, 1.0)).unwrap();
    let a = Var::from_tensor(&randn(&[2, 8], &mut rng, 0.3)).unwrap();
    let b = Var::from_tensor(&randn(&[5, 2], &mut rng, 0.3)).unwrap();
    let lin = LoraLinear {
        weight: randn(&[5, 8], &mut rng, 0.3),
        lora: Some((
            LoraPair {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
            },
            2.0,
        )),
    };
    check(
        "lora linear",
        &[("x", &x), ("A", &a), ("B", &b)],
        || project(&lin.forward(&x, D).unwrap(), 6),
        12,
    );
}

#[test]
fn qwen3_masked_attention_and_lora_gradients_through_the_model() {
    let dir = parity("models/gqa2_untied");
    let case = load(&parity("cases/gqa2_untied.safetensors"));
    let (ids, mask) = ids_and_mask(&case);
    let mut model = Qwen3::load(&dir, DType::F64, &Device::Cpu).unwrap();
    let mut lora = Lora::load(&dir.join("lora"), &Device::Cpu).unwrap();
    let mut vars = Vec::new();
    for (site, pair) in lora.pairs.iter_mut() {
        let a = Var::from_tensor(&pair.a.to_dtype(DType::F64).unwrap()).unwrap();
        let b = Var::from_tensor(&pair.b.to_dtype(DType::F64).unwrap()).unwrap();
        pair.a = a.as_tensor().clone();
        pair.b = b.as_tensor().clone();
        vars.push((format!("{}.A", site.peft_prefix()), a));
        vars.push((format!("{}.B", site.peft_prefix()), b));
    }
    model.set_lora(lora, LoraMode::Unmerged).unwrap();
    // Loss only over real tokens: padding must neither contribute nor leak into them.
    let valid = case["attention_mask"]
        .to_dtype(DType::F64)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let loss = || {
        let h = model.forward(&ids, &mask, -1, D).unwrap();
        project(&h.broadcast_mul(&valid).unwrap(), 7)
    };
    let picked: Vec<(&str, &Var)> = vars
        .iter()
        .step_by(3)
        .map(|(n, v)| (n.as_str(), v))
        .collect();
    check("qwen3 + lora", &picked, loss, 4);
}

#[test]
fn resampler_gradients_for_every_parameter_kind() {
    let cfg = ResamplerConfig {
        input_dim: 6,
        width: 8,
        heads: 2,
        ff_mult: 2,
        layers: 2,
        num_latents: 3,
        output_dim: 5,
        pooled_dim: 4,
        norm_eps: 1e-5,
    };
    let mut rng = Rng::new(8);
    let mut vars: HashMap<String, Var> = HashMap::new();
    for (name, shape) in cfg.schema() {
        let init = if name.contains("norm") && name.ends_with("weight") {
            (randn(&shape, &mut rng, 0.1) + 1.0).unwrap()
        } else {
            randn(&shape, &mut rng, 0.4)
        };
        vars.insert(name, Var::from_tensor(&init).unwrap());
    }
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let r = Resampler::from_tensors(cfg, tensors, std::path::Path::new("test")).unwrap();
    let h = Var::from_tensor(&randn(&[2, 4, 6], &mut rng, 1.0)).unwrap();
    let mask =
        Tensor::from_vec(vec![1f64, 1., 1., 0., 1., 1., 1., 1.], (2, 4), &Device::Cpu).unwrap();
    let loss = || {
        let (e, p) = r.forward(&h, &mask, D).unwrap();
        (project(&e, 9) + project(&p, 10)).unwrap()
    };
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut picked: Vec<(&str, &Var)> = names.iter().map(|n| (n.as_str(), &vars[*n])).collect();
    picked.push(("hidden", &h));
    check("resampler", &picked, loss, 2);
    // A padded position's hidden state has no influence at all.
    let g = loss().backward().unwrap();
    let gh = g
        .get(h.as_tensor())
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(1, 3, 1)
        .unwrap();
    assert_eq!(
        gh.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
}
