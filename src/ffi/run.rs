//! Training exports: one training run (`training::Run`) per handle, driven by the host. The
//! host opens a run on a folder, asks its state (the captions it needs targets for), supplies
//! the teacher's targets for them, and saves or frees it; the library does everything else
//! (caption set, data order, accumulation, evaluation, metrics, checkpoints, resume).

use std::ffi::c_char;
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use once_cell::sync::Lazy;
use serde::Deserialize;

use super::boundary::{self, call, invalid, qwenclip_status, Failure, FfiResult};
use super::encoder::ENCODERS;
use super::registry::Registry;
use crate::data::load_caption_sources;
use crate::sampling::PredictionType;
use crate::training::run::{Event, Need, Resume, Run, RunSpec};
use crate::training::vision::{Judge, Judging};
use crate::training::{TargetDims, TrainConfig};
use crate::unet::UNetConfig;
use crate::LoraMode;

/// Where captions come from: folders and files (read by the library's one caption rule),
/// then inline text, one caption per line.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct CaptionSpec {
    paths: Vec<PathBuf>,
    text: Option<String>,
    column: Option<String>,
}

/// The JSON `qwenclip_run_open` takes (docs/c-api.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunOpenSpec {
    out: PathBuf,
    captions: CaptionSpec,
    #[serde(default)]
    settings: serde_json::Value,
    #[serde(default)]
    dims: TargetDims,
    #[serde(default = "auto")]
    resume: String,
    #[serde(default)]
    judge: Option<JudgeSpec>,
}

/// Who judges the student under the vision objective: `"host"` (the host walks each
/// trajectory with its own UNet and returns a gradient) or the library's UNet.
#[derive(Deserialize)]
#[serde(untagged)]
enum JudgeSpec {
    Named(String),
    Unet(Box<UnetJudgeSpec>),
}

/// The library's judge: a UNet file or folder (`Judge::load`), with the UNet config for a
/// single file that is not SDXL-sized, a prediction type and a timestep spacing over its
/// schedule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnetJudgeSpec {
    unet: PathBuf,
    #[serde(default)]
    config: Option<UNetConfig>,
    #[serde(default)]
    prediction: Option<String>,
    #[serde(default)]
    timestep_spacing: Option<String>,
}

impl JudgeSpec {
    fn judging(self, device: &Device) -> FfiResult<Judging> {
        match self {
            JudgeSpec::Named(name) if name == "host" => Ok(Judging::Host),
            JudgeSpec::Named(other) => Err(invalid(format!(
                "run JSON: judge is \"{other}\"; expected \"host\" or {{\"unet\": PATH, ...}}"
            ))),
            JudgeSpec::Unet(u) => {
                let prediction = u
                    .prediction
                    .as_deref()
                    .map(|p| {
                        PredictionType::parse(p).ok_or_else(|| {
                            invalid(format!(
                                "run JSON: judge.prediction is \"{p}\"; expected \"epsilon\" or \"v_prediction\""
                            ))
                        })
                    })
                    .transpose()?;
                let mut judge =
                    Judge::load(&u.unet, u.config.as_ref(), prediction, DType::F32, device)?;
                if u.timestep_spacing.is_some() {
                    judge.scheduler.timestep_spacing = u.timestep_spacing;
                }
                Ok(Judging::Unet(Box::new(judge)))
            }
        }
    }
}

fn auto() -> String {
    "auto".into()
}

/// A run and what its last supply reported.
struct Slot {
    run: Run,
    events: Vec<Event>,
}

static RUNS: Lazy<Registry<Mutex<Slot>>> = Lazy::new(|| Registry::new("run", 0x7A1E));

fn lock(s: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn held_bytes() -> Vec<(usize, bool)> {
    RUNS.all()
        .iter()
        .map(|s| {
            let s = lock(s);
            let t = s.run.trainer();
            (
                t.encoder().weight_bytes() + t.state_bytes(),
                t.encoder().llm().device().is_cuda(),
            )
        })
        .collect()
}

/// Every training setting with its default, as a JSON object (`TrainConfig`): what a host
/// shows before the user changes anything. `buf`/`len`/`needed` as for `qwenclip_run_state`.
#[no_mangle]
pub extern "C" fn qwenclip_train_defaults(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> qwenclip_status {
    call(|| {
        let d = serde_json::to_value(TrainConfig::default()).expect("defaults serialise");
        boundary::json_out(&d, buf, len, needed)
    })
}

/// Reads a caption set by the library's caption rule, for a host to show before training.
/// `spec_json`: `{"paths": [...], "text": "...", "column": null}`. Writes
/// `{"captions": [...], "read": n, "empty": n, "duplicates": n, "kept": n, "source": "..."}`.
#[no_mangle]
pub extern "C" fn qwenclip_captions_read(
    spec_json: *const c_char,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> qwenclip_status {
    call(|| {
        let spec: CaptionSpec =
            boundary::json_arg(boundary::str_arg(spec_json, "spec_json")?, "captions")?;
        let set = load_caption_sources(&spec.paths, spec.text.as_deref(), spec.column.as_deref())?;
        let r = &set.report;
        let value = serde_json::json!({
            "captions": set.captions, "read": r.read, "empty": r.empty,
            "duplicates": r.duplicates, "kept": r.kept, "source": r.source,
        });
        boundary::json_out(&value, buf, len, needed)
    })
}

/// Opens a training run on the encoder's base model (the encoder is not changed; the run
/// shares its frozen weights). `spec_json` (docs/c-api.md): `out` (the run folder),
/// `captions` (`{"paths", "text", "column"}`), `settings` (TrainConfig fields; the rest are
/// the defaults, or the checkpoint's when resuming), `dims` (SDXL by default), `resume`
/// (`"auto"`: continue the run in `out` if it has a checkpoint; `"never"`; `"always"`).
/// A fresh run starts from the encoder's adapter when it has one.
#[no_mangle]
pub extern "C" fn qwenclip_run_open(
    encoder: u64,
    spec_json: *const c_char,
    out_handle: *mut u64,
) -> qwenclip_status {
    call(|| {
        let spec: RunOpenSpec =
            boundary::json_arg(boundary::str_arg(spec_json, "spec_json")?, "run")?;
        let out = boundary::out_ptr(out_handle, "out_handle")?;
        let resume = match spec.resume.as_str() {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            "always" => Resume::From(spec.out.clone()),
            other => {
                return Err(invalid(format!(
                    "run JSON: resume is \"{other}\"; expected \"auto\", \"never\" or \"always\""
                )))
            }
        };
        let c = &spec.captions;
        let captions = load_caption_sources(&c.paths, c.text.as_deref(), c.column.as_deref())?;
        let mut enc = ENCODERS.get(encoder)?.with(|e| Ok(e.clone()))?;
        enc.set_lora_mode(LoraMode::Unmerged);
        let judge = match spec.judge {
            Some(j) => j.judging(enc.llm().device())?,
            None => Judging::None,
        };
        let run = Run::open(
            enc,
            captions.captions,
            RunSpec {
                out: spec.out,
                settings: spec.settings,
                dims: spec.dims,
                resume,
                judge,
            },
        );
        // Opening loads (a judge's UNet, a checkpoint): their temporaries are not reused.
        crate::allocator::release();
        *out = RUNS.insert(Mutex::new(Slot {
            run: run?,
            events: Vec::new(),
        }));
        Ok(())
    })
}

fn event_json(e: &Event) -> serde_json::Value {
    match e {
        Event::Step {
            report,
            samples_per_s,
            ..
        } => serde_json::json!({"kind": "step", "report": report, "samples_per_s": samples_per_s}),
        Event::Eval { step, metrics } => {
            serde_json::json!({"kind": "eval", "step": step, "metrics": metrics})
        }
        Event::Saved { step, path } => {
            serde_json::json!({"kind": "saved", "step": step, "path": path})
        }
    }
}

/// The run's state as JSON: `step`, `steps`, `epoch`, `done`, `need` (`"train"`, `"eval"`,
/// `"baseline"`, `"empty"` or null when done), `trajectory` (for a vision training batch),
/// `judge` (`"host"`, `"unet"` or null), `captions` (the captions whose targets
/// `qwenclip_run_supply` takes next, in order), `events` (what the last supply did: steps,
/// evaluations, saves), `notes` (what opening decided about changed settings), `settings`,
/// `out`, `adapter`, `caption_count`, `save_sizes` (bytes each save writes: `adapter_bytes`,
/// `checkpoint_bytes`), `summary`. A NULL `buf` asks only for `needed` (the size
/// with the NUL).
#[no_mangle]
pub extern "C" fn qwenclip_run_state(
    handle: u64,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let mut s = lock(&slot);
        let request = s.run.request().cloned();
        let trajectory = s.run.request_trajectory().cloned();
        let run = &s.run;
        let (need, captions): (Option<Need>, Vec<&str>) = match &request {
            Some(r) => (Some(r.need), run.captions_of(r)),
            None => (None, Vec::new()),
        };
        let value = serde_json::json!({
            "step": run.step(), "steps": run.config().steps, "epoch": run.epoch(),
            "done": run.is_done(), "need": need, "captions": captions,
            "trajectory": trajectory, "judge": run.judged_by(),
            "events": s.events.iter().map(event_json).collect::<Vec<_>>(),
            "notes": run.notes(), "settings": run.config(), "out": run.out(),
            "adapter": run.adapter_dir(), "caption_count": run.captions().len(),
            "save_sizes": run.trainer().save_sizes(),
            "summary": run.summary(),
        });
        boundary::json_out(&value, buf, len, needed)
    })
}

/// The teacher's targets for the captions `qwenclip_run_state` listed: `embeds`
/// `[n, seq, embed]` and `pooled` `[n, pooled]`, f32, sizes in floats (checked). On
/// `QWENCLIP_NON_FINITE` the run stopped at its last good state (the checkpoint on disk is
/// the last good one).
#[no_mangle]
pub extern "C" fn qwenclip_run_supply(
    handle: u64,
    embeds: *const f32,
    embeds_len: usize,
    pooled: *const f32,
    pooled_len: usize,
) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let mut s = lock(&slot);
        let [es, ps] = target_shapes(&mut s.run)?;
        let e = read_floats(embeds, embeds_len, &es, "embeds")?;
        let p = read_floats(pooled, pooled_len, &ps, "pooled")?;
        s.events.clear();
        s.events = s.run.supply(&e, &p)?;
        Ok(())
    })
}

/// The shapes of the targets (and gradients) the run's pending request takes: `[n, seq,
/// embed]` and `[n, pooled]`.
fn target_shapes(run: &mut Run) -> FfiResult<[Shape; 2]> {
    let n = run
        .request()
        .map(|r| r.rows())
        .ok_or_else(|| invalid("the run is done: it needs no more targets"))?;
    let d = run.trainer().dims();
    Ok([(n, d.seq, d.embed).into(), (n, d.pooled).into()])
}

/// A host's float buffer of `shape` (its length checked) as a tensor.
fn read_floats(ptr: *const f32, len: usize, shape: &Shape, what: &str) -> FfiResult<Tensor> {
    let values = boundary::buffer(ptr, len, shape.elem_count(), what)?;
    Ok(Tensor::from_slice(values, shape, &Device::Cpu)?)
}

/// Copies `t` (f32, any shape) into a host buffer of `len` floats (checked).
fn copy_out(t: &Tensor, out: *mut f32, len: usize, what: &str) -> FfiResult<()> {
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    boundary::buffer_mut(out, len, values.len(), what)?.copy_from_slice(&values);
    Ok(())
}

/// The standard normal noise the pending trajectory starts from (`trajectory` in the state),
/// `[n, channels, resolution / 8, resolution / 8]` into `noise` (`len` floats, checked): a
/// host that judges walks the trajectory from it, scaled by its first sigma.
#[no_mangle]
pub extern "C" fn qwenclip_run_noise(
    handle: u64,
    channels: usize,
    noise: *mut f32,
    len: usize,
) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let t = lock(&slot).run.trajectory_noise(channels)?;
        copy_out(&t, noise, len, "noise")
    })
}

/// The student's conditioning for the captions of the pending training batch of a run the
/// host judges (`"judge": "host"`): `embeds` `[n, seq, embed]` and `pooled` `[n, pooled]`,
/// f32, sizes in floats (checked). The host computes its vision loss from these and returns
/// the gradient with `qwenclip_run_supply_gradient`.
#[no_mangle]
pub extern "C" fn qwenclip_run_conditioning(
    handle: u64,
    embeds: *mut f32,
    embeds_len: usize,
    pooled: *mut f32,
    pooled_len: usize,
) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let (e, p) = lock(&slot).run.student_conditioning()?;
        copy_out(&e, embeds, embeds_len, "embeds")?;
        copy_out(&p, pooled, pooled_len, "pooled")
    })
}

/// The host's answer for a training batch of a run it judges: the teacher's targets (as for
/// `qwenclip_run_supply`), the vision loss it computed and its gradient with respect to the
/// conditioning `qwenclip_run_conditioning` gave (`grad_embeds` `[n, seq, embed]`,
/// `grad_pooled` `[n, pooled]`). The library backpropagates it through resampler and LoRA and
/// steps (accumulation, clipping, metrics, checkpoints as for any step).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn qwenclip_run_supply_gradient(
    handle: u64,
    embeds: *const f32,
    embeds_len: usize,
    pooled: *const f32,
    pooled_len: usize,
    grad_embeds: *const f32,
    grad_embeds_len: usize,
    grad_pooled: *const f32,
    grad_pooled_len: usize,
    loss: f64,
) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let mut s = lock(&slot);
        let [es, ps] = target_shapes(&mut s.run)?;
        let e = read_floats(embeds, embeds_len, &es, "embeds")?;
        let p = read_floats(pooled, pooled_len, &ps, "pooled")?;
        let ge = read_floats(grad_embeds, grad_embeds_len, &es, "grad_embeds")?;
        let gp = read_floats(grad_pooled, grad_pooled_len, &ps, "grad_pooled")?;
        s.events.clear();
        s.events = s.run.supply_gradient((&e, &p), (&ge, &gp), loss)?;
        Ok(())
    })
}

/// Saves a checkpoint and the adapter now (a host's Cancel): the run resumes from here. A run
/// stopped before its end is marked interrupted in its metrics.
#[no_mangle]
pub extern "C" fn qwenclip_run_save(handle: u64) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let mut s = lock(&slot);
        let saved = s.run.stop()?;
        s.events = vec![saved];
        Ok(())
    })
}

/// The loss picture (what `loss.png` shows) as RGB bytes, row-major. `width`/`height` get its
/// size; a NULL `rgb` asks only for them; otherwise `len` must be `width * height * 3`.
#[no_mangle]
pub extern "C" fn qwenclip_run_loss_image(
    handle: u64,
    rgb: *mut u8,
    len: usize,
    width: *mut usize,
    height: *mut usize,
) -> qwenclip_status {
    call(|| {
        let slot = RUNS.get(handle)?;
        let img = lock(&slot).run.loss_image();
        *boundary::out_ptr(width, "width")? = img.width;
        *boundary::out_ptr(height, "height")? = img.height;
        if rgb.is_null() {
            return Ok(());
        }
        if len != img.rgb.len() {
            return Err(Failure::new(
                qwenclip_status::QWENCLIP_BUFFER_SIZE,
                format!("`rgb` holds {len} bytes, {} are needed", img.rgb.len()),
            ));
        }
        // Safety: the caller promises `len` writable bytes at `rgb`; checked above.
        unsafe { std::slice::from_raw_parts_mut(rgb, len) }.copy_from_slice(&img.rgb);
        Ok(())
    })
}

/// Frees a run (what was not saved is lost; `qwenclip_run_save` first to keep it).
#[no_mangle]
pub extern "C" fn qwenclip_run_free(handle: u64) -> qwenclip_status {
    call(|| {
        drop(RUNS.remove(handle)?);
        crate::allocator::release();
        Ok(())
    })
}
