//! One training run, the same for every host (the CLI, the C ABI, the ComfyUI node): the
//! caption set and its data order, gradient accumulation, held-out evaluation, metrics, the
//! loss picture, atomic checkpoints, the adapter export and exact resume, in one run folder
//! ([`folder`]).
//!
//! The run does not know where the teacher's targets come from. It is a state machine that
//! asks for them: [`Run::request`] names the captions it needs next (a training micro-batch,
//! a held-out batch, or training captions for the predict-the-mean baseline), and
//! [`Run::supply`] takes the targets for exactly those captions. The CLI answers from a
//! target cache ([`drive`]); the ComfyUI node answers with the checkpoint's own CLIP.

mod folder;
mod order;
mod settings;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{TargetDims, TrainConfig};
use super::plot::LossImage;
use super::trainer::{output_loss, read_state, EvalMetrics, Loss, StepReport, Trainer};
use super::vision::{collapse, injected_loss, vision_loss, Judging, Objective, Trajectory};
use crate::conditioning::Encoder;
use crate::data::fingerprint_of_hashes;
use crate::error::{Error, Result};
use crate::ops::ForwardMode;
use crate::rng::Rng;

use folder::RunFolder;
pub use folder::{checkpoint_path, ADAPTER_DIR, CHECKPOINT_FILE, LOSS_PNG, METRICS_FILE};
use order::DataOrder;

/// Mixed into the run's seed for the generator trajectories draw from.
const VISION_SEED: u64 = 0x715_1011;

/// Training captions per request while summing the baseline's mean target.
const BASELINE_CHUNK: usize = 64;

/// Whether a run continues from the checkpoint in a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Start fresh; a folder that already holds a run or an adapter is refused.
    Never,
    /// Continue the run in the output folder if it has a checkpoint, else start fresh.
    Auto,
    /// Continue the run whose checkpoint is in this folder (an error if there is none).
    From(PathBuf),
}

/// Where and how to run.
pub struct RunSpec {
    pub out: PathBuf,
    /// Some [`TrainConfig`] fields as a JSON object: over the defaults for a new run, over
    /// the checkpoint's settings for a resumed one (see [`settings`]).
    pub settings: serde_json::Value,
    pub dims: TargetDims,
    pub resume: Resume,
    /// Who judges the student under the vision objective: the library's frozen SDXL UNet
    /// (evaluation uses it too) or the host.
    pub judge: Judging,
}

/// What the run asks targets for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    /// The empty prompt, once (the unconditional branch of guidance on the teacher's
    /// trajectories): one row of targets, and no indices.
    Empty,
    /// Training captions, once, for the predict-the-mean baseline.
    Baseline,
    /// Held-out captions.
    Eval,
    /// The next micro-batch.
    Train,
}

/// The captions (positions in the run's caption list) the next [`Run::supply`] answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub need: Need,
    pub indices: Vec<usize>,
}

impl Request {
    /// Rows of targets this request takes.
    pub fn rows(&self) -> usize {
        match self.need {
            Need::Empty => 1,
            _ => self.indices.len(),
        }
    }
}

/// What happened during a [`Run::supply`] or [`Run::stop`].
#[derive(Debug, Clone)]
pub enum Event {
    Step {
        report: StepReport,
        samples_per_s: f64,
        total_steps: u64,
    },
    Eval {
        step: u64,
        metrics: EvalMetrics,
    },
    Saved {
        step: u64,
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub baseline_mean: EvalMetrics,
    pub first_eval: EvalMetrics,
    pub final_eval: EvalMetrics,
    pub interrupted: bool,
    pub adapter: PathBuf,
}

/// Which caption set a run was made on; a resume on another one is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CaptionsRef {
    count: usize,
    fingerprint: String,
}

/// The run's own state, saved as the `extra` of every checkpoint next to the trainer's.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    #[serde(flatten)]
    order: DataOrder,
    #[serde(default)]
    captions: Option<CaptionsRef>,
    #[serde(default)]
    baseline_mean: Option<EvalMetrics>,
    #[serde(default)]
    first_eval: Option<EvalMetrics>,
    #[serde(default)]
    last_eval: Option<EvalMetrics>,
    /// An evaluation that was due when the checkpoint was written (a stop mid-evaluation).
    #[serde(default)]
    eval_due: Option<u64>,
    /// The vision objective's trajectory in progress, and the generator new ones draw from.
    #[serde(default)]
    trajectory: Option<Trajectory>,
    #[serde(default)]
    vision_rng: Option<Rng>,
}

enum Phase {
    /// Waiting for the empty prompt's targets, then `then`.
    Uncond {
        then: Box<Phase>,
    },
    Baseline {
        next: usize,
        sum: Option<(Tensor, Tensor)>,
    },
    Eval(Box<EvalProgress>),
    Train,
    Done,
}

/// An evaluation under way.
struct EvalProgress {
    step: u64,
    next: usize,
    metrics: EvalMetrics,
    /// The mean training target and its score (the first evaluation only).
    baseline: Option<((Tensor, Tensor), EvalMetrics)>,
    /// Student and teacher summaries of every held-out prompt so far (collapse measure).
    summaries: Vec<(Vec<f32>, Vec<f32>)>,
}

impl EvalProgress {
    fn at(step: u64) -> Phase {
        Phase::Eval(Box::new(EvalProgress {
            step,
            next: 0,
            metrics: EvalMetrics::default(),
            baseline: None,
            summaries: Vec::new(),
        }))
    }
}

/// A request handed out, with the state the run moves to once it is answered.
struct Pending {
    request: Request,
    /// A training batch's data order after it.
    order: Option<DataOrder>,
    /// A new trajectory, and the generator after drawing it.
    trajectory: Option<(Trajectory, Rng)>,
    /// The student's conditioning handed to a host that judges it, with its graph.
    student: Option<(Tensor, Tensor)>,
}

/// What a host that judges the student returns for a training micro-batch: the loss it
/// computed and its gradient with respect to the conditioning the run handed out.
struct Injected {
    grad_embeds: Tensor,
    grad_pooled: Tensor,
    loss: f64,
}

pub struct Run {
    trainer: Trainer,
    captions: Vec<String>,
    state: LoopState,
    folder: RunFolder,
    phase: Phase,
    judge: Judging,
    /// The teacher's conditioning of the empty prompt.
    uncond: Option<(Tensor, Tensor)>,
    /// The latents of the trajectory in progress (its seed and step), not saved: replayed.
    latents: Option<(u64, usize, Tensor)>,
    pending: Option<Pending>,
    micro: Vec<StepReport>,
    started: Instant,
    notes: Vec<String>,
    interrupted: bool,
}

impl Run {
    /// Opens a run on `captions` (the full caption set, in order) with `encoder` as the
    /// student: fresh (from the encoder's adapter when it has one that fits, else from the
    /// seed) or resumed from a checkpoint, as `spec.resume` says.
    pub fn open(mut encoder: Encoder, captions: Vec<String>, mut spec: RunSpec) -> Result<Run> {
        if captions.is_empty() {
            return Err(Error::Invalid("there are no captions to train on".into()));
        }
        let judge = std::mem::take(&mut spec.judge);
        let folder = RunFolder::new(&spec.out);
        let captions_ref = CaptionsRef {
            count: captions.len(),
            fingerprint: fingerprint_of_hashes(
                &captions
                    .iter()
                    .map(|c| crate::data::caption_hash(c))
                    .collect::<Vec<_>>(),
            ),
        };
        let from = match &spec.resume {
            Resume::From(dir) => Some(dir.clone()),
            Resume::Auto if folder.checkpoint().is_file() => Some(spec.out.clone()),
            _ => {
                refuse_to_overwrite(&spec.out)?;
                None
            }
        };
        let mut run = match from {
            Some(dir) => {
                encoder.set_adapter(None)?;
                Self::resume(encoder, captions, captions_ref, spec, &dir, folder)?
            }
            None => {
                let cfg = TrainConfig::overlay(&TrainConfig::default(), &spec.settings)?;
                settings::validate(&cfg)?;
                let order = DataOrder::new(captions.len(), cfg.held_out, cfg.seed);
                if order.train().is_empty() {
                    return Err(Error::Invalid(format!(
                        "all {} captions are held out: lower held_out",
                        captions.len()
                    )));
                }
                let trainer = Trainer::new(encoder, cfg, spec.dims)?;
                let state = LoopState {
                    order,
                    captions: Some(captions_ref),
                    baseline_mean: None,
                    first_eval: None,
                    last_eval: None,
                    eval_due: None,
                    trajectory: None,
                    vision_rng: None,
                };
                Run::assemble(trainer, captions, state, folder, Vec::new())
            }
        };
        run.attach_judge(judge)?;
        let resumed_at = (run.trainer.step_count() > 0 || run.state.first_eval.is_some())
            .then(|| run.trainer.step_count());
        run.folder.open(resumed_at)?;
        if resumed_at.is_some() {
            // A kill between the checkpoint and the adapter (see `save`) left an older
            // adapter; a run resumed at its last step would never write it again.
            run.trainer.save_adapter(&run.folder.adapter())?;
        }
        run.start_without_held_out()?;
        Ok(run)
    }

    /// Checks the judge against the objective and the targets, and asks for the empty
    /// prompt's targets first when there is one.
    fn attach_judge(&mut self, judge: Judging) -> Result<()> {
        let objective = self.config().objective;
        match &judge {
            Judging::None if objective.needs_judge() => {
                return Err(Error::Invalid(format!(
                    "the {objective:?} objective needs the SDXL UNet that judges the student (a judge): give one (`--unet`)"
                )))
            }
            Judging::Unet(j) => {
                let d = self.trainer.dims();
                let (ctx, pooled) = (j.unet.config().context_dim(), j.unet.config().pooled_dim());
                if (ctx, pooled) != (d.embed, d.pooled) {
                    return Err(Error::Mismatch(format!(
                        "the judge UNet takes conditioning {ctx} wide with a {pooled}-wide pooled vector, but the targets are {} and {}",
                        d.embed, d.pooled
                    )));
                }
            }
            Judging::None | Judging::Host => {}
        }
        self.judge = judge;
        // With the library's judge every run asks for the empty prompt (evaluation uses it
        // too); a host that judges has its own.
        if matches!(self.judge, Judging::Unet(_)) && !matches!(self.phase, Phase::Done) {
            let then = std::mem::replace(&mut self.phase, Phase::Done);
            self.phase = Phase::Uncond {
                then: Box::new(then),
            };
        }
        Ok(())
    }

    /// Without held-out captions there is no baseline to compute and nothing to evaluate:
    /// the first evaluation is logged as empty, as every later one is.
    fn start_without_held_out(&mut self) -> Result<()> {
        if !matches!(self.phase, Phase::Baseline { .. }) || !self.state.order.held_out().is_empty()
        {
            return Ok(());
        }
        let empty = EvalMetrics::default();
        self.folder
            .log(serde_json::json!({ "baseline_mean": empty }))?;
        self.folder
            .log(serde_json::json!({"step": 0, "eval": empty}))?;
        self.state.baseline_mean = Some(empty.clone());
        self.state.first_eval = Some(empty.clone());
        self.state.last_eval = Some(empty);
        self.phase = if self.step() >= self.config().steps {
            Phase::Done
        } else {
            Phase::Train
        };
        Ok(())
    }

    fn resume(
        encoder: Encoder,
        captions: Vec<String>,
        captions_ref: CaptionsRef,
        spec: RunSpec,
        dir: &Path,
        folder: RunFolder,
    ) -> Result<Run> {
        let ckpt = checkpoint_path(dir);
        if !ckpt.is_file() {
            return Err(Error::format(
                dir,
                format!("no {CHECKPOINT_FILE} to resume from"),
            ));
        }
        let saved = read_state(&ckpt)?;
        let state: LoopState = serde_json::from_value(saved.extra.clone()).map_err(|e| {
            Error::format(
                &ckpt,
                format!("no data order in this checkpoint ({e}): it was not written by a training run; train into a new folder"),
            )
        })?;
        if saved.dims != spec.dims {
            return Err(Error::Mismatch(format!(
                "{} was trained for targets {:?}, these are {:?}",
                ckpt.display(),
                saved.dims,
                spec.dims
            )));
        }
        match &state.captions {
            Some(c) if *c != captions_ref => {
                return Err(Error::Invalid(format!(
                    "{} was trained on another caption set ({} captions, {}); these are {} captions ({}): train into a new folder, or give it the captions it was trained on",
                    ckpt.display(),
                    c.count,
                    c.fingerprint,
                    captions_ref.count,
                    captions_ref.fingerprint
                )))
            }
            None if !state.order.fits(captions.len()) => {
                return Err(Error::format(
                    &ckpt,
                    format!(
                        "its data order does not fit this set of {} captions",
                        captions.len()
                    ),
                ))
            }
            _ => {}
        }
        let (mut trainer, _) = Trainer::resume(encoder, &ckpt)?;
        let (cfg, notes) = settings::reconcile(
            trainer.config(),
            &spec.settings,
            trainer.step_count(),
            &ckpt,
        )?;
        trainer.retune(cfg)?;
        let mut state = state;
        state.captions = Some(captions_ref);
        Ok(Run::assemble(trainer, captions, state, folder, notes))
    }

    fn assemble(
        trainer: Trainer,
        captions: Vec<String>,
        state: LoopState,
        folder: RunFolder,
        notes: Vec<String>,
    ) -> Run {
        let step = trainer.step_count();
        let phase = if let Some(s) = state.eval_due {
            EvalProgress::at(s)
        } else if step == 0 && state.first_eval.is_none() {
            Phase::Baseline { next: 0, sum: None }
        } else if step >= trainer.config().steps {
            Phase::Done
        } else {
            Phase::Train
        };
        Run {
            trainer,
            captions,
            state,
            folder,
            phase,
            judge: Judging::None,
            uncond: None,
            latents: None,
            pending: None,
            micro: Vec::new(),
            started: Instant::now(),
            notes,
            interrupted: false,
        }
    }

    /// Who judges the student: `"host"`, `"unet"` (the library's) or `None`.
    pub fn judged_by(&self) -> Option<&'static str> {
        match self.judge {
            Judging::None => None,
            Judging::Unet(_) => Some("unet"),
            Judging::Host => Some("host"),
        }
    }

    /// The captions, in the order indices refer to.
    pub fn captions(&self) -> &[String] {
        &self.captions
    }

    pub fn config(&self) -> &TrainConfig {
        self.trainer.config()
    }

    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The reports of the micro-batches trained since the last optimizer step (its
    /// [`Event::Step`] gives their mean).
    pub fn micro_reports(&self) -> &[StepReport] {
        &self.micro
    }

    /// The vision objective's trajectory in progress (its step: the denoising steps trained).
    pub fn trajectory(&self) -> Option<&Trajectory> {
        self.state.trajectory.as_ref()
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.trainer.step_count()
    }

    pub fn epoch(&self) -> u64 {
        self.state.order.epoch()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// What opening the run decided about settings that differ from a resumed checkpoint's.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn out(&self) -> &Path {
        self.folder.dir()
    }

    pub fn adapter_dir(&self) -> PathBuf {
        self.folder.adapter()
    }

    /// The loss picture as it is now (the same as `loss.png`).
    pub fn loss_image(&self) -> LossImage {
        self.folder.loss_image()
    }

    /// The captions whose targets the run needs next; `None` once the run is done. Asking
    /// again before [`Run::supply`] gives the same request.
    pub fn request(&mut self) -> Option<&Request> {
        if self.pending.is_none() {
            self.pending = self.next_request();
        }
        self.pending.as_ref().map(|p| &p.request)
    }

    /// The captions of a request (the empty prompt for [`Need::Empty`]).
    pub fn captions_of(&self, request: &Request) -> Vec<&str> {
        match request.need {
            Need::Empty => vec![""],
            _ => request
                .indices
                .iter()
                .map(|&i| self.captions[i].as_str())
                .collect(),
        }
    }

    fn next_request(&self) -> Option<Pending> {
        let chunk = |from: &[usize], next: usize, size: usize| -> Vec<usize> {
            from[next..(next + size).min(from.len())].to_vec()
        };
        let simple = |need, indices| Pending {
            request: Request { need, indices },
            order: None,
            trajectory: None,
            student: None,
        };
        match &self.phase {
            Phase::Uncond { .. } => Some(simple(Need::Empty, Vec::new())),
            Phase::Baseline { next, .. } => Some(simple(
                Need::Baseline,
                chunk(self.state.order.train(), *next, BASELINE_CHUNK),
            )),
            Phase::Eval(e) => Some(simple(
                Need::Eval,
                chunk(
                    self.state.order.held_out(),
                    e.next,
                    self.config().eval_batch_size.max(1),
                ),
            )),
            Phase::Train if self.config().objective.needs_judge() => {
                if let Some(t) = &self.state.trajectory {
                    return Some(simple(Need::Train, t.indices.clone()));
                }
                let (indices, order) = self.state.order.next_batch(self.config().batch_size);
                let mut rng = self
                    .state
                    .vision_rng
                    .unwrap_or_else(|| Rng::new(self.config().seed ^ VISION_SEED));
                let trajectory = Trajectory::new(indices.clone(), &self.config().vision, &mut rng);
                Some(Pending {
                    request: Request {
                        need: Need::Train,
                        indices,
                    },
                    order: Some(order),
                    trajectory: Some((trajectory, rng)),
                    student: None,
                })
            }
            Phase::Train => {
                let (indices, order) = self.state.order.next_batch(self.config().batch_size);
                Some(Pending {
                    request: Request {
                        need: Need::Train,
                        indices,
                    },
                    order: Some(order),
                    trajectory: None,
                    student: None,
                })
            }
            Phase::Done => None,
        }
    }

    /// The trajectory the pending training request walks under the vision objective (a new
    /// one, or the one in progress at the denoising step it trains next); `None` for other
    /// requests.
    pub fn request_trajectory(&mut self) -> Option<&Trajectory> {
        self.request()?;
        let pending = self.pending.as_ref()?;
        if pending.request.need != Need::Train {
            return None;
        }
        pending
            .trajectory
            .as_ref()
            .map(|(t, _)| t)
            .or(self.state.trajectory.as_ref())
    }

    /// The standard normal noise the pending trajectory starts from, `[n, channels,
    /// resolution / 8, resolution / 8]` on the CPU: a host that walks the trajectory starts
    /// from it (scaled by its first sigma), so a resumed run walks it again exactly, on any
    /// device.
    pub fn trajectory_noise(&mut self, channels: usize) -> Result<Tensor> {
        let Some(t) = self.request_trajectory().cloned() else {
            return Err(Error::Invalid(format!(
                "{} now: there is no trajectory",
                self.asks()
            )));
        };
        let side = t.resolution / 8;
        t.noise((t.indices.len(), channels, side, side), 1.0, &Device::Cpu)
    }

    /// What the run asks for now, in words (for errors).
    fn asks(&mut self) -> String {
        match self.request().map(|r| r.need) {
            None => "the run is done".into(),
            Some(need) => format!("the run asks for {need:?} targets"),
        }
    }

    /// Whether the host judges the training batches (its judge, a vision objective).
    fn host_judges(&self) -> bool {
        matches!(self.judge, Judging::Host) && self.config().objective.needs_judge()
    }

    /// The student's conditioning for the pending training batch of a run the host judges:
    /// prompt embeddings `[n, seq, embed]` and pooled `[n, pooled]`, f32, detached. The run
    /// keeps its graph for the gradient the host returns ([`Run::supply_gradient`]).
    pub fn student_conditioning(&mut self) -> Result<(Tensor, Tensor)> {
        if !self.host_judges() {
            return Err(Error::Invalid(
                "only a run the host judges under the vision or mixed objective hands out the student's conditioning".into(),
            ));
        }
        if self.request().map(|r| r.need) != Some(Need::Train) {
            return Err(Error::Invalid(format!(
                "{}; the student's conditioning is for training batches",
                self.asks()
            )));
        }
        let pending = self.pending.as_mut().expect("requested above");
        if pending.student.is_none() {
            let prompts: Vec<&str> = pending
                .request
                .indices
                .iter()
                .map(|&i| self.captions[i].as_str())
                .collect();
            pending.student = Some(
                self.trainer
                    .predict(&prompts, ForwardMode::Differentiable)?,
            );
        }
        let (e, p) = pending.student.as_ref().expect("computed above");
        Ok((e.detach(), p.detach()))
    }

    /// The host's answer for the pending training batch of a run it judges: the teacher's
    /// targets (as for [`Run::supply`]; the `mixed` objective's output term and the metrics
    /// use them), the vision loss it computed from [`Run::student_conditioning`], and that
    /// loss's gradient with respect to the conditioning (`[n, seq, embed]`, `[n, pooled]`).
    /// The library backpropagates it through resampler and LoRA and steps as for any batch.
    pub fn supply_gradient(
        &mut self,
        (embeds, pooled): (&Tensor, &Tensor),
        (grad_embeds, grad_pooled): (&Tensor, &Tensor),
        loss: f64,
    ) -> Result<Vec<Event>> {
        if !self.host_judges() {
            return Err(Error::Invalid(
                "only a run the host judges under the vision or mixed objective takes a gradient: supply the targets alone".into(),
            ));
        }
        let Some(req) = self.request().cloned() else {
            return Err(Error::Invalid(
                "the run is done: it needs no more targets".into(),
            ));
        };
        if req.need != Need::Train {
            return Err(Error::Invalid(format!(
                "{}: supply those without a gradient",
                self.asks()
            )));
        }
        let (n, d) = (req.rows(), self.trainer.dims());
        if grad_embeds.dims() != [n, d.seq, d.embed] || grad_pooled.dims() != [n, d.pooled] {
            return Err(Error::Invalid(format!(
                "the gradient must be [{n}, {}, {}] and [{n}, {}] for {n} captions, got {:?} and {:?}",
                d.seq,
                d.embed,
                d.pooled,
                grad_embeds.dims(),
                grad_pooled.dims()
            )));
        }
        let device = self.trainer.encoder().llm().device().clone();
        let injected = Injected {
            grad_embeds: grad_embeds.to_device(&device)?.to_dtype(DType::F32)?,
            grad_pooled: grad_pooled.to_device(&device)?.to_dtype(DType::F32)?,
            loss,
        };
        self.answer(embeds, pooled, Some(injected))
    }

    /// The teacher's targets for the captions of the current [`Run::request`]: prompt
    /// embeddings `[n, seq, embed]` and pooled `[n, pooled]`, any float dtype and device.
    pub fn supply(&mut self, embeds: &Tensor, pooled: &Tensor) -> Result<Vec<Event>> {
        self.answer(embeds, pooled, None)
    }

    /// [`Run::supply`], with the host's loss and gradient when it judges.
    fn answer(
        &mut self,
        embeds: &Tensor,
        pooled: &Tensor,
        injected: Option<Injected>,
    ) -> Result<Vec<Event>> {
        if self.pending.is_none() {
            self.request();
        }
        let Some(pending) = self.pending.take() else {
            return Err(Error::Invalid(
                "the run is done: it needs no more targets".into(),
            ));
        };
        let req = pending.request.clone();
        let n = req.rows();
        let d = self.trainer.dims();
        if embeds.dims() != [n, d.seq, d.embed] || pooled.dims() != [n, d.pooled] {
            let err = Error::Invalid(format!(
                "teacher targets must be [{n}, {}, {}] and [{n}, {}] for {n} captions, got {:?} and {:?}",
                d.seq,
                d.embed,
                d.pooled,
                embeds.dims(),
                pooled.dims()
            ));
            self.pending = Some(pending);
            return Err(err);
        }
        if req.need == Need::Train && self.host_judges() != injected.is_some() {
            self.pending = Some(pending);
            return Err(Error::Invalid(if injected.is_none() {
                "the host judges this run's training batches: give the loss and its gradient with the targets (supply_gradient)".into()
            } else {
                "only a run the host judges under the vision or mixed objective takes a gradient: supply the targets alone".into()
            }));
        }
        let device = self.trainer.encoder().llm().device().clone();
        let te = embeds.to_device(&device)?.to_dtype(DType::F32)?;
        let tp = pooled.to_device(&device)?.to_dtype(DType::F32)?;
        let result = match req.need {
            Need::Empty => self.supply_uncond(te, tp),
            Need::Baseline => self.supply_baseline(n, te, tp),
            Need::Eval => self.supply_eval(&req.indices, &te, &tp),
            Need::Train => self.supply_train(&req.indices, &te, &tp, pending, injected),
        };
        if result.is_err() && self.pending.is_none() {
            // Nothing was consumed: the same captions are asked for again.
            self.pending = self.next_request();
        }
        result
    }

    fn supply_uncond(&mut self, te: Tensor, tp: Tensor) -> Result<Vec<Event>> {
        let Phase::Uncond { then } = std::mem::replace(&mut self.phase, Phase::Done) else {
            unreachable!("an empty-prompt request comes from its phase");
        };
        self.uncond = Some((te, tp));
        self.phase = *then;
        self.start_without_held_out()?;
        Ok(Vec::new())
    }

    fn supply_baseline(&mut self, n: usize, te: Tensor, tp: Tensor) -> Result<Vec<Event>> {
        let Phase::Baseline { next, sum } = &mut self.phase else {
            unreachable!("a baseline request comes from the baseline phase");
        };
        let part = (
            te.to_dtype(DType::F64)?.sum_keepdim(0)?,
            tp.to_dtype(DType::F64)?.sum_keepdim(0)?,
        );
        let total = match sum.take() {
            None => part,
            Some((a, b)) => ((a + part.0)?, (b + part.1)?),
        };
        *next += n;
        if *next < self.state.order.train().len() {
            *sum = Some(total);
            return Ok(Vec::new());
        }
        let count = self.state.order.train().len() as f64;
        let mean = (
            (total.0 / count)?.to_dtype(DType::F32)?,
            (total.1 / count)?.to_dtype(DType::F32)?,
        );
        self.phase = EvalProgress::at(0);
        if let Phase::Eval(e) = &mut self.phase {
            e.baseline = Some((mean, EvalMetrics::default()));
        }
        Ok(Vec::new())
    }

    fn supply_eval(&mut self, indices: &[usize], te: &Tensor, tp: &Tensor) -> Result<Vec<Event>> {
        let prompts: Vec<&str> = indices.iter().map(|&i| self.captions[i].as_str()).collect();
        let (mut part, se, sp) = self.trainer.evaluate_outputs(&prompts, te, tp)?;
        if let (Judging::Unet(judge), Some(uncond)) = (&self.judge, &self.uncond) {
            let u = (&uncond.0, &uncond.1);
            let cfg = &self.trainer.config().vision;
            part.vision_loss = Some(judge.eval_loss(indices, (&se, &sp), (te, tp), u, cfg)?);
        }
        let pairs: Vec<(Vec<f32>, Vec<f32>)> = collapse::summaries(&se, &sp)?
            .into_iter()
            .zip(collapse::summaries(te, tp)?)
            .collect();
        let Phase::Eval(e) = &mut self.phase else {
            unreachable!("an evaluation request comes from the evaluation phase");
        };
        e.summaries.extend(pairs);
        if let Some(((me, mp), score)) = &mut e.baseline {
            let k = indices.len();
            let pred = (
                me.broadcast_as(te.shape())?.contiguous()?,
                mp.broadcast_as((k, mp.dim(1)?))?.contiguous()?,
            );
            *score = score.merge(&EvalMetrics::of((&pred.0, &pred.1), (te, tp))?);
        }
        e.metrics = e.metrics.merge(&part);
        e.next += indices.len();
        if e.next < self.state.order.held_out().len() {
            return Ok(Vec::new());
        }
        self.finish_eval()
    }

    /// An evaluation over no held-out captions completes at once (and scores nothing).
    fn finish_eval_if_empty(&mut self) -> Result<Vec<Event>> {
        if self.state.order.held_out().is_empty() {
            self.finish_eval()
        } else {
            Ok(Vec::new())
        }
    }

    fn finish_eval(&mut self) -> Result<Vec<Event>> {
        let Phase::Eval(progress) = std::mem::replace(&mut self.phase, Phase::Train) else {
            unreachable!("only an evaluation finishes one");
        };
        let EvalProgress {
            step,
            mut metrics,
            baseline,
            summaries,
            ..
        } = *progress;
        if summaries.len() >= 2 {
            let (student, teacher): (Vec<_>, Vec<_>) = summaries.into_iter().unzip();
            metrics.pairwise_cos_student = Some(collapse::pairwise_cosine(&student));
            metrics.pairwise_cos_teacher = Some(collapse::pairwise_cosine(&teacher));
        }
        if let Some((_, score)) = baseline {
            self.folder
                .log(serde_json::json!({ "baseline_mean": score }))?;
            self.state.baseline_mean = Some(score);
        }
        self.folder
            .log(serde_json::json!({"step": step, "eval": metrics}))?;
        if step == 0 && self.state.first_eval.is_none() {
            self.state.first_eval = Some(metrics.clone());
        }
        self.state.last_eval = Some(metrics.clone());
        self.state.eval_due = None;
        let mut events = vec![Event::Eval { step, metrics }];
        if step > 0 {
            self.folder.refresh_plot()?;
            events.extend(self.after_eval(step)?);
        } else if self.step() >= self.config().steps {
            self.phase = Phase::Done;
        }
        Ok(events)
    }

    fn supply_train(
        &mut self,
        indices: &[usize],
        te: &Tensor,
        tp: &Tensor,
        pending: Pending,
        injected: Option<Injected>,
    ) -> Result<Vec<Event>> {
        let owned: Vec<String> = indices.iter().map(|&i| self.captions[i].clone()).collect();
        let prompts: Vec<&str> = owned.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let stepped = if let Some(injected) = injected {
            self.host_vision_step(&prompts, te, tp, &pending, injected)
        } else if self.config().objective.needs_judge() {
            self.vision_step(&prompts, te, tp, &pending)
        } else {
            self.trainer.step(&prompts, te, tp).map(|r| (r, None))
        };
        let (report, trajectory) = match stepped {
            Ok(r) => r,
            Err(e @ Error::NonFinite(_)) => {
                self.folder
                    .log(serde_json::json!({"step": self.step(), "error": e.to_string()}))?;
                let ckpt = self.folder.checkpoint();
                let kept = if ckpt.is_file() {
                    format!("the last good checkpoint is kept: {}", ckpt.display())
                } else {
                    "no checkpoint was written before it".to_string()
                };
                return Err(Error::NonFinite(format!("{e}; {kept}")));
            }
            Err(e) => return Err(e),
        };
        if let Some(order) = pending.order {
            self.state.order = order;
        }
        if let Some((_, rng)) = pending.trajectory {
            self.state.vision_rng = Some(rng);
        }
        if self.config().objective.needs_judge() {
            self.state.trajectory = trajectory.filter(|t| !t.is_done());
        }
        let samples_per_s = indices.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        self.micro.push(report.clone());
        if !report.optimizer_stepped {
            return Ok(Vec::new());
        }
        let report = mean_of_micro_batches(&self.micro, report);
        self.micro.clear();
        let mut line = serde_json::to_value(&report).expect("a report serialises");
        line["samples_per_s"] = samples_per_s.into();
        line["elapsed_s"] = self.started.elapsed().as_secs_f64().into();
        line.as_object_mut()
            .expect("a report is an object")
            .remove("optimizer_stepped");
        self.folder.log(line)?;
        let step = report.step;
        let mut events = vec![Event::Step {
            report,
            samples_per_s,
            total_steps: self.config().steps,
        }];
        let eval_every = self.config().eval_every;
        if (eval_every > 0 && step.is_multiple_of(eval_every)) || step >= self.config().steps {
            self.phase = EvalProgress::at(step);
            self.state.eval_due = Some(step);
            events.extend(self.finish_eval_if_empty()?);
        } else {
            events.extend(self.after_eval(step)?);
        }
        Ok(events)
    }

    /// One denoising step of the trajectory in progress (or a new one): the teacher's
    /// prediction and the next latents, the student's prediction through the same UNet, the
    /// vision loss (plus output MSE for `mixed`), one trainer step. Returns the report and
    /// the trajectory one step further; the caller keeps both only when the step succeeded.
    fn vision_step(
        &mut self,
        prompts: &[&str],
        te: &Tensor,
        tp: &Tensor,
        pending: &Pending,
    ) -> Result<(StepReport, Option<Trajectory>)> {
        let mut trajectory = self.walking(pending);
        let Judging::Unet(judge) = &self.judge else {
            unreachable!("the vision objective has its judge");
        };
        let uncond = self.uncond.as_ref().expect("asked for before training");
        let uncond = (&uncond.0, &uncond.1);
        let sampler = judge.sampler(trajectory.sampler, trajectory.denoise_steps)?;
        let n = prompts.len();
        let time_ids = judge.time_ids(n, trajectory.resolution)?;
        let latents = match &self.latents {
            Some((seed, step, x)) if *seed == trajectory.seed && *step == trajectory.step => {
                x.clone()
            }
            _ => judge.replay(&trajectory, sampler.as_ref(), (te, tp), uncond)?,
        };
        let k = trajectory.step;
        let (teacher_eps, next) = judge.teacher_step(
            sampler.as_ref(),
            k,
            &latents,
            &time_ids,
            (te, tp),
            uncond,
            &trajectory.guidance,
        )?;
        let cfg = self.trainer.config().clone();
        let report = self.trainer.step_with(prompts, |e, p| {
            let student = judge.predict(
                sampler.as_ref(),
                k,
                &latents,
                &time_ids,
                (e, p),
                ForwardMode::Differentiable,
            )?;
            let lv = vision_loss(&student, &teacher_eps)?;
            vision_objective(&cfg, lv, (e, p), (te, tp))
        })?;
        trajectory.step += 1;
        self.latents = Some((trajectory.seed, trajectory.step, next));
        Ok((report, Some(trajectory)))
    }

    /// One denoising step judged by the host: the loss and gradient it returned for the
    /// conditioning [`Run::student_conditioning`] handed out (recomputed when it was not
    /// asked for), plus output MSE for `mixed`; one trainer step.
    fn host_vision_step(
        &mut self,
        prompts: &[&str],
        te: &Tensor,
        tp: &Tensor,
        pending: &Pending,
        injected: Injected,
    ) -> Result<(StepReport, Option<Trajectory>)> {
        let mut trajectory = self.walking(pending);
        let outputs = match &pending.student {
            Some(s) => s.clone(),
            None => self.trainer.predict(prompts, ForwardMode::Differentiable)?,
        };
        let cfg = self.trainer.config().clone();
        let report = self.trainer.step_on(outputs, |e, p| {
            let grads = (&injected.grad_embeds, &injected.grad_pooled);
            let lv = injected_loss((e, p), grads, injected.loss)?;
            vision_objective(&cfg, lv, (e, p), (te, tp))
        })?;
        trajectory.step += 1;
        Ok((report, Some(trajectory)))
    }

    /// The trajectory a vision request walks: the new one it carries or the one in progress.
    fn walking(&self, pending: &Pending) -> Trajectory {
        match (&pending.trajectory, &self.state.trajectory) {
            (Some((t, _)), _) | (None, Some(t)) => t.clone(),
            (None, None) => unreachable!("a vision request carries or continues a trajectory"),
        }
    }

    /// After a step's evaluation (or a step without one): save if due; done at the end.
    fn after_eval(&mut self, step: u64) -> Result<Vec<Event>> {
        let last = step >= self.config().steps;
        let save_every = self.config().save_every;
        let mut events = Vec::new();
        if (save_every > 0 && step.is_multiple_of(save_every)) || last {
            events.push(self.save()?);
        }
        self.phase = if last { Phase::Done } else { Phase::Train };
        Ok(events)
    }

    /// Writes the checkpoint (first: a crash between the two leaves a resumable run), then
    /// the adapter and the loss picture.
    pub fn save(&mut self) -> Result<Event> {
        let extra = serde_json::to_value(&self.state).expect("loop state serialises");
        self.trainer.save(&self.folder.checkpoint(), extra)?;
        self.trainer.save_adapter(&self.folder.adapter())?;
        self.folder.refresh_plot()?;
        Ok(Event::Saved {
            step: self.step(),
            path: self.folder.dir().to_path_buf(),
        })
    }

    /// Stops before the end (Ctrl-C, Cancel): saves a checkpoint to resume from.
    pub fn stop(&mut self) -> Result<Event> {
        self.interrupted = !self.is_done();
        let saved = self.save()?;
        if self.interrupted {
            self.folder.log(
                serde_json::json!({"step": self.step(), "event": "interrupted, checkpoint saved"}),
            )?;
        }
        Ok(saved)
    }

    pub fn summary(&self) -> RunSummary {
        RunSummary {
            steps: self.step(),
            baseline_mean: self.state.baseline_mean.clone().unwrap_or_default(),
            first_eval: self.state.first_eval.clone().unwrap_or_default(),
            final_eval: self.state.last_eval.clone().unwrap_or_default(),
            interrupted: self.interrupted,
            adapter: self.folder.adapter(),
        }
    }
}

/// The optimizer step's report with the loss and its parts averaged over the micro-batches
/// that made it.
/// The vision objectives' loss from the vision term: `lambda_vision * vision`, plus
/// `lambda_mse *` the output MSE against the teacher's targets for `mixed`.
fn vision_objective(
    cfg: &TrainConfig,
    vision: Tensor,
    (e, p): (&Tensor, &Tensor),
    (te, tp): (&Tensor, &Tensor),
) -> Result<Loss> {
    let v = &cfg.vision;
    let mut total = (&vision * v.lambda_vision)?;
    let mut parts = vec![("loss_vision", vision)];
    if cfg.objective == Objective::Mixed {
        let weights = (cfg.loss_weight_embeds, cfg.loss_weight_pooled);
        let o = output_loss(e, p, te, tp, weights)?;
        total = (total + (&o.total * v.lambda_mse)?)?;
        parts.extend(o.parts);
    }
    Ok(Loss { total, parts })
}

fn mean_of_micro_batches(micro: &[StepReport], last: StepReport) -> StepReport {
    let n = micro.len() as f64;
    let mut parts = last.parts.clone();
    for (k, v) in parts.iter_mut() {
        *v = micro.iter().filter_map(|r| r.parts.get(k)).sum::<f64>() / n;
    }
    StepReport {
        loss: micro.iter().map(|r| r.loss).sum::<f64>() / n,
        parts,
        ..last
    }
}

/// A fresh run never writes over a finished adapter or another run's checkpoint.
fn refuse_to_overwrite(out: &Path) -> Result<()> {
    let ckpt = checkpoint_path(out);
    if ckpt.is_file() {
        let at = read_state(&ckpt)
            .map(|s| format!(" (at step {})", s.t))
            .unwrap_or_default();
        return Err(Error::Invalid(format!(
            "{} already holds a training run{at}: resume it, or train into another folder",
            out.display()
        )));
    }
    for adapter in [out.join(ADAPTER_DIR), out.to_path_buf()] {
        if adapter.join(crate::adapter::MANIFEST_FILE).is_file()
            || adapter.join(crate::lora::CONFIG_FILE).is_file()
        {
            return Err(Error::Invalid(format!(
                "{} already holds an adapter and no checkpoint to resume: training would overwrite it; train into another folder",
                out.display()
            )));
        }
    }
    Ok(())
}

/// The teacher's targets (prompt embeddings, pooled) for captions at these positions.
pub type Targets<'a> = dyn FnMut(&Request) -> Result<(Tensor, Tensor)> + 'a;

/// Runs `run` to its end, or until `stop` is set (then saves and marks it interrupted),
/// answering its requests with `targets` (positions in the run's caption list -> the
/// teacher's embeddings and pooled vectors).
pub fn drive(
    run: &mut Run,
    targets: &mut Targets,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunSummary> {
    while let Some(req) = run.request() {
        if stop.load(Ordering::SeqCst) {
            on_event(&run.stop()?);
            break;
        }
        let req = req.clone();
        let (e, p) = targets(&req)?;
        for ev in run.supply(&e, &p)? {
            on_event(&ev);
        }
    }
    Ok(run.summary())
}
