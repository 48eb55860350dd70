//! One distillation step at a time: the library API the CLI's training loop, the C ABI and
//! the ComfyUI training node all drive. LoRA (unmerged, on the frozen LLM) and resampler are
//! trained together against cached teacher outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::config::{TargetDims, TrainConfig};
use super::optim::{self, AdamW};
use super::schedule;
use crate::adapter::{Adapter, AdapterManifest, BaseModelRef};
use crate::conditioning::Encoder;
use crate::error::{Error, Result};
use crate::formats::save_atomic;
use crate::lora::{Lora, LoraConfig, LoraPair, Site};
use crate::ops::ForwardMode;
use crate::resampler::{Resampler, ResamplerConfig};
use crate::rng::Rng;
use crate::LoraMode;

const LORA_GROUP: usize = 0;
const RESAMPLER_GROUP: usize = 1;
const CHECKPOINT_KEY: &str = "qwenclip.trainer";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub loss: f64,
    /// The loss's named parts (`loss_embeds`, `loss_pooled`, `loss_vision`, ...), unweighted.
    #[serde(flatten)]
    pub parts: BTreeMap<String, f64>,
    /// Global norm of the accumulated gradient, before clipping (set when the optimizer stepped).
    pub grad_norm: Option<f64>,
    pub optimizer_stepped: bool,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub lr_lora: f64,
    pub lr_resampler: f64,
}

/// What a training step minimises: the total, and named parts to report.
pub struct Loss {
    pub total: Tensor,
    pub parts: Vec<(&'static str, Tensor)>,
}

/// Output matching: `w_e MSE(embeds) + w_p MSE(pooled)` against the teacher's outputs.
pub fn output_loss(
    embeds: &Tensor,
    pooled: &Tensor,
    teacher_embeds: &Tensor,
    teacher_pooled: &Tensor,
    (w_embeds, w_pooled): (f64, f64),
) -> Result<Loss> {
    let le = mse(embeds, teacher_embeds)?;
    let lp = mse(pooled, teacher_pooled)?;
    Ok(Loss {
        total: ((&le * w_embeds)? + (&lp * w_pooled)?)?,
        parts: vec![("loss_embeds", le), ("loss_pooled", lp)],
    })
}

/// `name value, ...` for messages.
pub fn describe_parts(parts: &BTreeMap<String, f64>) -> String {
    parts
        .iter()
        .map(|(k, v)| format!("{} {v:.5}", k.trim_start_matches("loss_")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes a save writes (tensor data; the files' headers add a few kilobytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveSizes {
    pub adapter_bytes: u64,
    pub checkpoint_bytes: u64,
}

/// Held-out quality: MSE and cosine similarity per token and for the pooled vector; with a
/// judge UNet, the vision loss at fixed noise; over the whole held-out set, the collapse
/// measure (mean pairwise cosine between different prompts' conditionings, student and
/// teacher: see [`crate::training::vision::collapse`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub count: usize,
    pub mse_embeds: f64,
    pub mse_pooled: f64,
    pub cos_tokens: f64,
    pub cos_pooled: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairwise_cos_student: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairwise_cos_teacher: Option<f64>,
}

impl EvalMetrics {
    /// Weighted merge of two partial results (batches of an evaluation). The pairwise
    /// measures are over the whole set and are set once it is complete.
    pub fn merge(&self, other: &EvalMetrics) -> EvalMetrics {
        let n = (self.count + other.count).max(1) as f64;
        let (a, b) = (self.count as f64 / n, other.count as f64 / n);
        let vision_loss = match (self.vision_loss, other.vision_loss) {
            (Some(x), Some(y)) => Some(x * a + y * b),
            (x, None) if other.count == 0 => x,
            (None, y) if self.count == 0 => y,
            _ => None,
        };
        EvalMetrics {
            count: self.count + other.count,
            mse_embeds: self.mse_embeds * a + other.mse_embeds * b,
            mse_pooled: self.mse_pooled * a + other.mse_pooled * b,
            cos_tokens: self.cos_tokens * a + other.cos_tokens * b,
            cos_pooled: self.cos_pooled * a + other.cos_pooled * b,
            vision_loss,
            pairwise_cos_student: None,
            pairwise_cos_teacher: None,
        }
    }

    /// Metrics of `pred` against `target` (`[B,S,D]` + `[B,P]` each).
    pub fn of(pred: (&Tensor, &Tensor), target: (&Tensor, &Tensor)) -> Result<Self> {
        let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok(Self {
            count: pred.1.dim(0)?,
            mse_embeds: scalar(mse(pred.0, target.0)?)?,
            mse_pooled: scalar(mse(pred.1, target.1)?)?,
            cos_tokens: scalar(cosine(pred.0, target.0)?.mean_all()?)?,
            cos_pooled: scalar(cosine(pred.1, target.1)?.mean_all()?)?,
            ..Default::default()
        })
    }
}

fn mse(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

fn cosine(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    dot / ((na * nb)? + 1e-12)?
}

/// A trainer owns the encoder it trains; [`Trainer::into_encoder`] hands it back.
pub struct Trainer {
    encoder: Encoder,
    resampler: Resampler,
    lora_config: LoraConfig,
    sites: Vec<Site>,
    opt: AdamW,
    acc: BTreeMap<String, Tensor>,
    micro: usize,
    cfg: TrainConfig,
    dims: TargetDims,
}

fn lora_name(site: &Site, which: char) -> String {
    format!("lora.{}.lora_{which}.weight", site.peft_prefix())
}

impl Trainer {
    /// Starts training on `encoder`. If it already carries an adapter made for these target
    /// dims, training continues from it; otherwise LoRA (PEFT init: A uniform, B zero) and
    /// resampler are initialised from `cfg.seed`.
    pub fn new(mut encoder: Encoder, cfg: TrainConfig, dims: TargetDims) -> Result<Self> {
        if cfg.grad_accum == 0 {
            return Err(Error::Invalid("grad_accum must be at least 1".into()));
        }
        let device = encoder.llm().device().clone();
        let llm_cfg = encoder.llm().config().clone();
        let mut rng = Rng::new(cfg.seed);
        let existing_lora = encoder.llm().lora().map(|(l, _)| l.clone());
        let (lora_config, init_pairs) = match existing_lora {
            Some(l) => (l.config.clone(), l.pairs.clone()),
            None => {
                let targets: Vec<&str> = cfg.lora_targets.iter().map(String::as_str).collect();
                let mut lc = LoraConfig::new(
                    cfg.lora_r,
                    cfg.lora_alpha,
                    &targets,
                    Some(encoder.base_name().to_string()),
                );
                lc.use_rslora = cfg.use_rslora;
                lc.targets()
                    .map_err(|m| Error::Invalid(format!("lora targets: {m}")))?;
                let mut pairs = BTreeMap::new();
                for layer in 0..llm_cfg.num_hidden_layers {
                    for module in &cfg.lora_targets {
                        let site = Site {
                            layer,
                            module: module.clone(),
                        };
                        let (out, inp) = llm_cfg.projection_shape(module).ok_or_else(|| {
                            Error::Invalid(format!("lora targets: unknown module {module}"))
                        })?;
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a = Tensor::from_vec(
                            rng.uniform_vec(cfg.lora_r * inp, bound),
                            (cfg.lora_r, inp),
                            &device,
                        )?;
                        let b = Tensor::zeros((out, cfg.lora_r), DType::F32, &device)?;
                        pairs.insert(site, LoraPair { a, b });
                    }
                }
                (lc, pairs)
            }
        };
        let init_resampler = match encoder.resampler() {
            Some(r)
                if r.config().num_latents == dims.seq
                    && r.config().output_dim == dims.embed
                    && r.config().pooled_dim == dims.pooled =>
            {
                r.clone()
            }
            _ => {
                let rc = cfg.resampler_for(llm_cfg.hidden_size, dims);
                Resampler::init(rc, &mut rng, &device)?
            }
        };

        let mut opt = AdamW::new(cfg.adamw);
        let mut pairs = BTreeMap::new();
        for (site, pair) in init_pairs {
            let a = Var::from_tensor(&pair.a.to_dtype(DType::F32)?.to_device(&device)?)?;
            let b = Var::from_tensor(&pair.b.to_dtype(DType::F32)?.to_device(&device)?)?;
            pairs.insert(
                site.clone(),
                LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                },
            );
            opt.add(lora_name(&site, 'A'), a, LORA_GROUP, true)?;
            opt.add(lora_name(&site, 'B'), b, LORA_GROUP, true)?;
        }
        let sites = pairs.keys().cloned().collect();
        encoder.llm_mut().set_lora(
            Lora {
                config: lora_config.clone(),
                pairs,
            },
            LoraMode::Unmerged,
        )?;

        let mut r_tensors = HashMap::new();
        for (name, t) in init_resampler.params() {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            r_tensors.insert(name.clone(), var.as_tensor().clone());
            opt.add(
                format!("resampler.{name}"),
                var,
                RESAMPLER_GROUP,
                t.rank() >= 2 && name != "latents",
            )?;
        }
        let resampler = Resampler::from_tensors(
            init_resampler.config().clone(),
            r_tensors,
            Path::new("<trainer>"),
        )?;
        Ok(Self {
            encoder,
            resampler,
            lora_config,
            sites,
            opt,
            acc: BTreeMap::new(),
            micro: 0,
            cfg,
            dims,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Takes new settings for what may change between steps (schedule, learning rates,
    /// AdamW, clipping, loss weights, accumulation). The caller keeps the adapter's shape.
    pub fn retune(&mut self, cfg: TrainConfig) -> Result<()> {
        if cfg.grad_accum == 0 {
            return Err(Error::Invalid("grad_accum must be at least 1".into()));
        }
        if self.micro >= cfg.grad_accum {
            return Err(Error::Invalid(format!(
                "grad_accum {} is not more than the {} micro-batches already accumulated",
                cfg.grad_accum, self.micro
            )));
        }
        self.opt.cfg = cfg.adamw;
        self.cfg = cfg;
        Ok(())
    }

    pub fn dims(&self) -> TargetDims {
        self.dims
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.opt.t
    }

    /// Micro-batches accumulated toward the next optimizer step.
    pub fn pending_micro_batches(&self) -> usize {
        self.micro
    }

    /// The gradient accumulated toward the next optimizer step, by parameter name (as in
    /// checkpoints' `acc.<name>`: `lora.<PEFT key>`, `resampler.<name>`): the sum of each
    /// micro-batch's gradient times `1 / grad_accum`; empty right after an optimizer step.
    pub fn accumulated_gradient(&self) -> &BTreeMap<String, Tensor> {
        &self.acc
    }

    /// Number of trainable values (LoRA + resampler).
    pub fn trainable_params(&self) -> usize {
        self.opt.params.values().map(|p| p.var.elem_count()).sum()
    }

    /// Bytes of trainable weights, AdamW moments and accumulated gradients.
    pub fn state_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let params: usize = self
            .opt
            .params
            .values()
            .map(|p| size(p.var.as_tensor()))
            .sum();
        let moments: usize = self.opt.moments().map(|(_, t)| size(t)).sum();
        params + moments + self.acc.values().map(size).sum::<usize>()
    }

    /// What each save writes: the adapter (trainable weights) and the checkpoint (weights,
    /// both AdamW moments, and the accumulated gradient when accumulating), in bytes.
    pub fn save_sizes(&self) -> SaveSizes {
        let weights = 4 * self.trainable_params() as u64;
        let copies = if self.cfg.grad_accum > 1 { 4 } else { 3 };
        SaveSizes {
            adapter_bytes: weights,
            checkpoint_bytes: weights * copies,
        }
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn learning_rates(&self) -> (f64, f64) {
        let f = schedule::factor(
            self.cfg.schedule,
            self.opt.t,
            self.cfg.warmup_steps,
            self.cfg.steps,
        );
        (self.cfg.lr_lora * f, self.cfg.lr_resampler * f)
    }

    fn check_targets(&self, n: usize, embeds: &Tensor, pooled: &Tensor) -> Result<()> {
        let d = self.dims;
        if embeds.dims() != [n, d.seq, d.embed] || pooled.dims() != [n, d.pooled] {
            return Err(Error::Invalid(format!(
                "teacher targets must be [{n}, {}, {}] and [{n}, {}] for {n} prompts, got {:?} and {:?}",
                d.seq, d.embed, d.pooled, embeds.dims(), pooled.dims()
            )));
        }
        Ok(())
    }

    /// Student conditioning for a batch (training path when `path` is differentiable).
    pub fn predict(&self, prompts: &[&str], path: ForwardMode) -> Result<(Tensor, Tensor)> {
        let h = self.encoder.hidden_states(prompts, path)?;
        self.resampler.forward(&h.states, &h.mask, path)
    }

    /// One micro-batch of output matching: MSE of the student's conditioning against the
    /// teacher's (weighted embeds + pooled); see [`Trainer::step_with`].
    pub fn step(
        &mut self,
        prompts: &[&str],
        teacher_embeds: &Tensor,
        teacher_pooled: &Tensor,
    ) -> Result<StepReport> {
        self.check_targets(prompts.len(), teacher_embeds, teacher_pooled)?;
        let device = self.encoder.llm().device().clone();
        let te = teacher_embeds.to_device(&device)?.to_dtype(DType::F32)?;
        let tp = teacher_pooled.to_device(&device)?.to_dtype(DType::F32)?;
        let weights = (self.cfg.loss_weight_embeds, self.cfg.loss_weight_pooled);
        self.step_with(prompts, |e, p| output_loss(e, p, &te, &tp, weights))
    }

    /// One micro-batch with any loss over the student's conditioning (`loss` gets the
    /// prompt embeddings `[n, seq, embed]` and pooled `[n, pooled]`, tracked): forward,
    /// loss, backward into LoRA and resampler, accumulate; every `grad_accum` calls, clip and
    /// step the optimizers. A non-finite loss or gradient returns [`Error::NonFinite`] and
    /// leaves weights, moments and the accumulated gradient as they were before the call.
    pub fn step_with(
        &mut self,
        prompts: &[&str],
        loss: impl FnOnce(&Tensor, &Tensor) -> Result<Loss>,
    ) -> Result<StepReport> {
        let outputs = self.predict(prompts, ForwardMode::Differentiable)?;
        self.step_on(outputs, loss)
    }

    /// [`Trainer::step_with`] on conditioning already computed by
    /// [`Trainer::predict`] with [`ForwardMode::Differentiable`] (a host that judges the
    /// student needs it before it can say the loss).
    pub fn step_on(
        &mut self,
        (e, p): (Tensor, Tensor),
        loss: impl FnOnce(&Tensor, &Tensor) -> Result<Loss>,
    ) -> Result<StepReport> {
        let loss = loss(&e, &p)?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let lv = scalar(&loss.total)?;
        let mut parts = BTreeMap::new();
        for (name, t) in &loss.parts {
            parts.insert(name.to_string(), scalar(t)?);
        }
        if !lv.is_finite() {
            return Err(Error::NonFinite(format!(
                "the loss is {lv} at step {} ({}); lower the learning rates or check the targets",
                self.opt.t,
                describe_parts(&parts)
            )));
        }
        let grads = loss.total.backward()?;
        let scale = 1.0 / self.cfg.grad_accum as f64;
        let mut acc = self.acc.clone();
        for (name, p) in &self.opt.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let g = if scale == 1.0 {
                    g.clone()
                } else {
                    (g * scale)?
                };
                let sum = match acc.remove(name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                acc.insert(name.clone(), sum);
            }
        }
        drop(grads);
        let (lr_lora, lr_resampler) = self.learning_rates();
        let mut report = StepReport {
            loss: lv,
            parts,
            grad_norm: None,
            optimizer_stepped: false,
            step: self.opt.t,
            lr_lora,
            lr_resampler,
        };
        if self.micro + 1 < self.cfg.grad_accum {
            self.acc = acc;
            self.micro += 1;
            return Ok(report);
        }
        let norm = optim::global_norm(&acc)?;
        if !norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "the gradient norm is {norm} at step {}; lower the learning rates",
                self.opt.t
            )));
        }
        let mut lrs = [0.0; 2];
        lrs[LORA_GROUP] = lr_lora;
        lrs[RESAMPLER_GROUP] = lr_resampler;
        let clip = optim::clip_factor(norm, self.cfg.max_grad_norm);
        self.opt.step(&acc, &lrs, clip)?;
        self.acc.clear();
        self.micro = 0;
        report.grad_norm = Some(norm);
        report.optimizer_stepped = true;
        report.step = self.opt.t;
        Ok(report)
    }

    /// Held-out metrics for a batch (inference path, no gradients).
    pub fn evaluate(
        &self,
        prompts: &[&str],
        teacher_embeds: &Tensor,
        teacher_pooled: &Tensor,
    ) -> Result<EvalMetrics> {
        Ok(self
            .evaluate_outputs(prompts, teacher_embeds, teacher_pooled)?
            .0)
    }

    /// [`Trainer::evaluate`], and the student's conditioning it scored (embeds, pooled).
    pub fn evaluate_outputs(
        &self,
        prompts: &[&str],
        teacher_embeds: &Tensor,
        teacher_pooled: &Tensor,
    ) -> Result<(EvalMetrics, Tensor, Tensor)> {
        self.check_targets(prompts.len(), teacher_embeds, teacher_pooled)?;
        let device = self.encoder.llm().device();
        let (e, p) = self.predict(prompts, ForwardMode::Fast)?;
        let (e, p) = (e.detach(), p.detach());
        let metrics = EvalMetrics::of(
            (&e, &p),
            (
                &teacher_embeds.to_device(device)?.to_dtype(DType::F32)?,
                &teacher_pooled.to_device(device)?.to_dtype(DType::F32)?,
            ),
        )?;
        Ok((metrics, e, p))
    }

    /// A snapshot of the current weights as an adapter bundle (copies, not views).
    pub fn adapter(&self) -> Result<Adapter> {
        let mut pairs = BTreeMap::new();
        for site in &self.sites {
            let get = |w| self.opt.params[&lora_name(site, w)].var.as_tensor().copy();
            pairs.insert(
                site.clone(),
                LoraPair {
                    a: get('A')?,
                    b: get('B')?,
                },
            );
        }
        let mut r = HashMap::new();
        for name in self.resampler.params().keys() {
            r.insert(
                name.clone(),
                self.opt.params[&format!("resampler.{name}")]
                    .var
                    .as_tensor()
                    .copy()?,
            );
        }
        let resampler =
            Resampler::from_tensors(self.resampler.config().clone(), r, Path::new("<trainer>"))?;
        let llm_cfg = self.encoder.llm().config();
        let manifest = AdapterManifest::new(
            BaseModelRef::of(self.encoder.base_name(), llm_cfg),
            self.encoder.hidden_layer(),
            self.encoder.max_tokens(),
            Some(resampler.config().clone()),
        );
        Ok(Adapter {
            dir: Default::default(),
            manifest: Some(manifest),
            lora: Some(Lora {
                config: self.lora_config.clone(),
                pairs,
            }),
            resampler: Some(resampler),
        })
    }

    /// Writes the adapter bundle (each file atomically).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        self.adapter()?.save(dir)
    }

    /// Ends training and returns the encoder with the trained adapter installed (merged).
    pub fn into_encoder(self) -> Result<Encoder> {
        let adapter = self.adapter()?;
        let mut enc = self.encoder;
        enc.llm_mut().clear_lora()?;
        enc.set_lora_mode(LoraMode::Merged);
        enc.install(adapter)?;
        Ok(enc)
    }

    /// Writes a checkpoint to `path` atomically: weights, AdamW moments, accumulated gradients,
    /// step counters, config, and `extra` (the caller's loop state: RNG, data order, ...).
    pub fn save(&self, path: &Path, extra: serde_json::Value) -> Result<()> {
        let mut tensors = HashMap::new();
        for (name, p) in &self.opt.params {
            tensors.insert(format!("param.{name}"), p.var.as_tensor().clone());
        }
        for (name, t) in self.opt.moments() {
            tensors.insert(name, t.clone());
        }
        for (name, t) in &self.acc {
            tensors.insert(format!("acc.{name}"), t.clone());
        }
        let state = CheckpointState {
            format_version: 1,
            t: self.opt.t,
            micro: self.micro,
            config: self.cfg.clone(),
            dims: self.dims,
            lora: self.lora_config.clone(),
            resampler: self.resampler.config().clone(),
            base_fingerprint: self.encoder.llm().config().fingerprint(),
            extra,
        };
        let mut meta = HashMap::new();
        meta.insert(
            CHECKPOINT_KEY.to_string(),
            serde_json::to_string(&state).expect("state serialises"),
        );
        save_atomic(&tensors, Some(meta), path)
    }

    /// Rebuilds a trainer from a checkpoint made by [`Trainer::save`] and returns it with the
    /// `extra` the run saved. `encoder` must have the same base (and no adapter).
    pub fn resume(encoder: Encoder, path: &Path) -> Result<(Self, serde_json::Value)> {
        let state = read_state(path)?;
        if state.base_fingerprint != encoder.llm().config().fingerprint() {
            return Err(Error::Mismatch(format!(
                "{} was trained on another base model ({}), this one is {}",
                path.display(),
                state.base_fingerprint,
                encoder.llm().config().shape_summary()
            )));
        }
        let device = encoder.llm().device().clone();
        let mut cfg = state.config.clone();
        cfg.lora_r = state.lora.r;
        cfg.resampler_width = state.resampler.width;
        cfg.resampler_heads = state.resampler.heads;
        cfg.resampler_ff_mult = state.resampler.ff_mult;
        cfg.resampler_layers = state.resampler.layers;
        check_fits_file(&cfg, encoder.llm().config(), state.dims, path)?;
        let mut trainer = Trainer::new(encoder, cfg, state.dims)?;
        let weights =
            crate::formats::Weights::open(&[path.to_path_buf()], path, DType::F32, &device)?;
        let get = |name: &str| -> Result<Tensor> {
            let shape = weights.shape_of(name)?;
            weights.get(name, &shape)
        };
        for (name, p) in &trainer.opt.params {
            let t = get(&format!("param.{name}"))?;
            if t.dims() != p.var.dims() {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    name: format!("param.{name}"),
                    expected: p.var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            p.var.set(&t)?;
        }
        trainer.opt.set_moments(&get)?;
        trainer.opt.t = state.t;
        trainer.micro = state.micro;
        // The settings as the run was given them ("0 = derived" included): the structure was
        // built from the checkpoint's own, and a resumed run saves what an uninterrupted one does.
        trainer.cfg = state.config;
        trainer.acc = trainer
            .opt
            .params
            .keys()
            .filter(|n| weights.contains(&format!("acc.{n}")))
            .map(|n| Ok((n.clone(), get(&format!("acc.{n}"))?)))
            .collect::<Result<_>>()?;
        Ok((trainer, state.extra))
    }
}

/// A checkpoint stores every trained value as f32, so its settings (read from its header)
/// cannot describe more of them than the file holds: checked before anything is built from
/// them, since a damaged header could ask for terabytes.
fn check_fits_file(
    cfg: &TrainConfig,
    llm: &crate::llm::Qwen3Config,
    dims: TargetDims,
    path: &Path,
) -> Result<()> {
    let resampler = cfg.resampler_for(llm.hidden_size, dims);
    resampler
        .validate()
        .map_err(|m| Error::format(path, format!("resampler settings: {m}")))?;
    // An unknown projection counts nothing here; building the run names it.
    let lora = cfg.lora_targets.iter().try_fold(0usize, |sum, module| {
        let (out, inp) = llm.projection_shape(module).unwrap_or((0, 0));
        cfg.lora_r
            .checked_mul(out + inp)?
            .checked_mul(llm.num_hidden_layers)?
            .checked_add(sum)
    });
    let bytes = lora
        .and_then(|n| n.checked_add(resampler.parameter_count()))
        .and_then(|n| n.checked_mul(4));
    let held = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    match bytes {
        Some(b) if b as u64 <= held => Ok(()),
        _ => Err(Error::format(
            path,
            format!(
                "its settings (LoRA rank {} on {:?}, resampler {} wide with {} layers) describe \
                 more trained values than the file's {held} bytes hold: the file is damaged",
                cfg.lora_r, cfg.lora_targets, resampler.width, resampler.layers
            ),
        )),
    }
}

/// The JSON half of a checkpoint (the tensors are the other half).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    pub t: u64,
    pub micro: usize,
    pub config: TrainConfig,
    pub dims: TargetDims,
    pub lora: LoraConfig,
    pub resampler: ResamplerConfig,
    pub base_fingerprint: String,
    pub extra: serde_json::Value,
}

pub fn read_state(path: &Path) -> Result<CheckpointState> {
    let meta = crate::formats::safetensors::read_metadata(path)?;
    let text = meta.get(CHECKPOINT_KEY).ok_or_else(|| {
        Error::format(
            path,
            "not a qwenclip training checkpoint (no trainer state in the metadata)",
        )
    })?;
    serde_json::from_str(text).map_err(|e| Error::format(path, format!("trainer state: {e}")))
}
