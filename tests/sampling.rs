//! The samplers against diffusers' `EulerDiscreteScheduler` / `DDIMScheduler` on the committed
//! fixtures (`tests/fixtures/sampling`, made by `tests/reference/make_sampler_fixtures.py`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use qwenclip::sampling::{
    denoise_vp, guide, Batch, BetaSchedule, Ddim, Euler, NoiseSchedule, PredictionType, Sampler,
    SchedulerConfig, Step,
};

/// How close to diffusers: 1e-6, relative to the magnitude of the values where it exceeds 1.
///
/// Two readings of "relative". Constants (betas, alphas, sigmas, guidance) are held to it per
/// element. Tensors coming out of a step are held to it relative to the largest magnitude the
/// computation handles (at least the compared tensor's largest |value|): torch's CPU `sqrt`
/// (MKL) is not correctly rounded, so diffusers' sigmas and `alphas_cumprod ** 0.5` sit an
/// ulp away from any exact implementation on ~20% of timesteps, and a step's cancellations
/// (`x - sigma * eps` with |x| ~ 40, DDIM's division by `sqrt(a)` ~ 0.07) turn that ulp into
/// ~1e-6 on elements near 0. A float32 implementation can do no better.
const TOL: f32 = 1e-6;

/// Later steps of whole runs: over 50 steps, diffusers' own result moves by up to 1.2e-6 of
/// the tensor's scale (3.5e-6 per element) when its sigmas / alphas are replaced by correctly
/// rounded ones (measured on the fixture's inputs); ours lands within 1.4e-6.
const RUN_TOL: f32 = 3e-6;

fn fixtures(rel: &str) -> std::path::PathBuf {
    root().join("tests/fixtures/sampling").join(rel)
}

fn expected() -> &'static HashMap<String, Tensor> {
    static ONCE: std::sync::OnceLock<HashMap<String, Tensor>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| load(&fixtures("expected.safetensors")))
}

fn want(key: &str) -> &'static Tensor {
    expected()
        .get(key)
        .unwrap_or_else(|| panic!("fixture tensor {key} is missing"))
}

/// Per element: `|got - want| <= TOL * max(1, |want|)`.
fn assert_each(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let got = got.to_dtype(DType::F32).unwrap();
    let want = want.to_dtype(DType::F32).unwrap();
    let scale = want.abs().unwrap().maximum(1f32).unwrap();
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .div(&scale)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= TOL, "{what}: max relative diff {d:e} > {TOL:e}");
}

/// `|got - want| <= tol * scale` with `scale = max(1, |want|max, at_least)`.
fn assert_scaled(what: &str, got: &Tensor, want: &Tensor, at_least: f32, tol: f32) {
    let scale = max_abs(want).max(at_least).max(1.0);
    let d = max_diff(got, want) / scale;
    assert!(
        d <= tol,
        "{what}: max diff {d:e} of scale {scale} > {tol:e}"
    );
}

fn assert_close_to(what: &str, got: &Tensor, want: &Tensor) {
    assert_scaled(what, got, want, 1.0, TOL);
}

fn vec_tensor(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

struct Case {
    name: String,
    euler: bool,
    steps: usize,
    recorded: Vec<usize>,
    config: SchedulerConfig,
}

impl Case {
    fn sampler(&self) -> Box<dyn Sampler> {
        if self.euler {
            Box::new(Euler::new(&self.config, self.steps).unwrap())
        } else {
            Box::new(Ddim::new(&self.config, self.steps).unwrap())
        }
    }

    fn want(&self, what: &str) -> &'static Tensor {
        want(&format!("{}/{what}", self.name))
    }

    /// The largest |x0| before DDIM's clipping at step `i` (1 for Euler): the scale of the
    /// values the clipped x0 was computed from.
    fn x0_scale(&self, i: usize) -> f32 {
        if self.euler {
            return 1.0;
        }
        let d = Ddim::new(&self.config, self.steps).unwrap();
        let alpha = Batch::All(d.alpha_prods(i).unwrap().0);
        let x0 = denoise_vp(d.prediction_type(), &model_output(i), sample(), &alpha).unwrap();
        max_abs(&x0.x0)
    }

    /// The fixture row for recorded step number `k`.
    fn want_at(&self, what: &str, k: usize) -> Tensor {
        self.want(what).get(k).unwrap()
    }
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures("cases.json")).unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let cases: Vec<Case> = list
        .into_iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            euler: match c["class"].as_str().unwrap() {
                "EulerDiscreteScheduler" => true,
                "DDIMScheduler" => false,
                other => panic!("unexpected class {other}"),
            },
            steps: c["steps"].as_u64().unwrap() as usize,
            recorded: serde_json::from_value(c["recorded_steps"].clone()).unwrap(),
            config: serde_json::from_value(c["config"].clone()).unwrap(),
        })
        .collect();
    assert_eq!(cases.len(), 25, "every case of the fixture is read");
    cases
}

fn sample() -> &'static Tensor {
    want("sample")
}

fn model_output(i: usize) -> Tensor {
    want("model_outputs").get(i).unwrap()
}

#[test]
fn sdxl_and_linear_training_schedules_match_diffusers() {
    let linear = NoiseSchedule::new(1000, 0.0001, 0.02, BetaSchedule::Linear).unwrap();
    for (name, s) in [("scaled_linear", NoiseSchedule::sdxl()), ("linear", linear)] {
        for (what, got) in [
            ("betas", s.betas()),
            ("alphas_cumprod", s.alphas_cumprod()),
            ("sigmas", s.sigmas()),
        ] {
            let key = format!("schedule/{name}/{what}");
            assert_each(&key, &vec_tensor(got), want(&key));
        }
    }
}

#[test]
fn euler_timesteps_sigmas_and_initial_noise_scale_match_diffusers() {
    for case in cases().iter().filter(|c| c.euler) {
        let e = Euler::new(&case.config, case.steps).unwrap();
        let n = &case.name;
        // Timesteps are whole numbers (or numpy's linspace fractions in float32): exact.
        assert_eq!(
            vec_tensor(e.timesteps()).to_vec1::<f32>().unwrap(),
            case.want("timesteps").to_vec1::<f32>().unwrap(),
            "{n} timesteps"
        );
        assert_eq!(
            e.sigmas().len(),
            case.steps + 1,
            "{n}: one sigma per step, then 0"
        );
        assert_eq!(e.sigmas()[case.steps], 0.0, "{n}: the final sigma is 0");
        assert_each(
            &format!("{n} sigmas"),
            &vec_tensor(e.sigmas()),
            case.want("sigmas"),
        );
        assert_each(
            &format!("{n} init_noise_sigma"),
            &vec_tensor(&[e.init_noise_sigma() as f32]),
            case.want("init_noise_sigma"),
        );
    }
}

#[test]
fn ddim_timesteps_and_alphas_match_diffusers() {
    for case in cases().iter().filter(|c| !c.euler) {
        let d = Ddim::new(&case.config, case.steps).unwrap();
        let n = &case.name;
        let got: Vec<i64> = d.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(
            got,
            case.want("timesteps").to_vec1::<i64>().unwrap(),
            "{n} timesteps"
        );
        let (now, prev): (Vec<f32>, Vec<f32>) =
            (0..case.steps).map(|i| d.alpha_prods(i).unwrap()).unzip();
        assert_each(
            &format!("{n} alpha_prod"),
            &vec_tensor(&now),
            case.want("alpha_prod"),
        );
        assert_each(
            &format!("{n} alpha_prod_prev"),
            &vec_tensor(&prev),
            case.want("alpha_prod_prev"),
        );
        assert_eq!(d.init_noise_sigma(), 1.0);
    }
}

#[test]
fn timestep_spacing_matches_diffusers_for_many_step_counts() {
    for spacing in ["leading", "trailing", "linspace"] {
        let mut cfg = SchedulerConfig::sdxl();
        cfg.timestep_spacing = Some(spacing.into());
        for n in [1, 2, 3, 7, 10, 25, 30, 33, 40, 60, 100] {
            let key = |kind: &str, what: &str| format!("spacing/{kind}/{spacing}/{n}/{what}");
            let e = Euler::new(&cfg, n).unwrap();
            let want_t = want(&key("euler", "timesteps")).to_vec1::<f32>().unwrap();
            assert_eq!(e.timesteps(), &want_t[..], "Euler {spacing} {n}");
            assert_each(
                &key("euler", "sigmas"),
                &vec_tensor(e.sigmas()),
                want(&key("euler", "sigmas")),
            );
            let d = Ddim::new(&cfg, n).unwrap();
            let got: Vec<i64> = d.timesteps().iter().map(|&t| t as i64).collect();
            let want_t = want(&key("ddim", "timesteps")).to_vec1::<i64>().unwrap();
            assert_eq!(got, want_t, "DDIM {spacing} {n}");
        }
    }
}

#[test]
fn scale_model_input_matches_diffusers() {
    for case in cases() {
        let s = case.sampler();
        for (k, &i) in case.recorded.iter().enumerate() {
            let got = s.scale_model_input(sample(), &Step::All(i)).unwrap();
            assert_close_to(
                &format!("{} scale_model_input at step {i}", case.name),
                &got,
                &case.want_at("scaled", k),
            );
        }
    }
}

#[test]
fn one_step_and_its_x0_match_diffusers() {
    for case in cases() {
        let s = case.sampler();
        for (k, &i) in case.recorded.iter().enumerate() {
            let out = model_output(i);
            let what = format!("{} step {i}", case.name);
            let prev = s.step(&out, &Step::All(i), sample()).unwrap();
            assert_close_to(&what, &prev, &case.want_at("step", k));
            let d = s.denoise(&out, &Step::All(i), sample()).unwrap();
            let x0_want = case.want_at("x0", k);
            assert_scaled(
                &format!("{what} x0"),
                &d.x0,
                &x0_want,
                case.x0_scale(i),
                TOL,
            );
        }
    }
}

#[test]
fn whole_runs_match_diffusers_pipelines() {
    let noise = want("noise");
    for case in cases() {
        let s = case.sampler();
        let mut x = (noise * s.init_noise_sigma()).unwrap();
        let mut kept = Vec::new();
        for i in 0..s.num_steps() {
            let _ = s.scale_model_input(&x, &Step::All(i)).unwrap();
            x = s.step(&model_output(i), &Step::All(i), &x).unwrap();
            if let Some(k) = case.recorded.iter().position(|&r| r == i) {
                kept.push((k, i, x.clone()));
            }
        }
        for (k, i, got) in kept {
            // Two consecutive steps from the start, then the middle and the last two.
            let tol = if i < 2 { TOL } else { RUN_TOL };
            let what = format!("{} run after step {i}", case.name);
            assert_scaled(&what, &got, &case.want_at("trajectory", k), 1.0, tol);
        }
    }
}

#[test]
fn per_sample_steps_equal_each_sample_stepped_alone() {
    for case in cases() {
        let s = case.sampler();
        let (k0, k1) = (0, case.recorded.len() - 1);
        let (i0, i1) = (case.recorded[k0], case.recorded[k1]);
        // Row 0 at the first step with its model output, row 1 at the last step with its own.
        let out = Tensor::cat(
            &[
                model_output(i0).narrow(0, 0, 1).unwrap(),
                model_output(i1).narrow(0, 1, 1).unwrap(),
            ],
            0,
        )
        .unwrap();
        let row = |what: &str| {
            Tensor::cat(
                &[
                    case.want_at(what, k0).narrow(0, 0, 1).unwrap(),
                    case.want_at(what, k1).narrow(0, 1, 1).unwrap(),
                ],
                0,
            )
            .unwrap()
        };
        let step = Step::Each(vec![i0, i1]);
        let what = format!("{} steps {i0} and {i1}", case.name);
        assert_close_to(&what, &s.step(&out, &step, sample()).unwrap(), &row("step"));
        let x0 = s.denoise(&out, &step, sample()).unwrap().x0;
        let scale = case.x0_scale(i0).max(case.x0_scale(i1));
        assert_scaled(&format!("{what} x0"), &x0, &row("x0"), scale, TOL);
        let scaled = s.scale_model_input(sample(), &step).unwrap();
        assert_close_to(&format!("{what} scaled"), &scaled, &row("scaled"));
        let t = s.timestep_input(&step, 2, &Device::Cpu).unwrap();
        assert_eq!(
            t.to_vec1::<f32>().unwrap(),
            [s.timestep(i0).unwrap(), s.timestep(i1).unwrap()]
        );
    }
}

#[test]
fn the_unet_timestep_is_the_scheduler_timestep_as_float32() {
    for case in cases() {
        let s = case.sampler();
        let want: Vec<f32> = case
            .want("timesteps")
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = (0..case.steps).map(|i| s.timestep(i).unwrap()).collect();
        assert_eq!(got, want, "{}", case.name);
        let t = s.timestep_input(&Step::All(3), 4, &Device::Cpu).unwrap();
        assert_eq!((t.dims(), t.dtype()), (&[4usize][..], DType::F32));
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![want[3]; 4]);
    }
}

#[test]
fn tensors_of_any_shape_give_the_same_values() {
    for case in cases() {
        let s = case.sampler();
        let i = case.recorded[2];
        let out = model_output(i);
        let want = s.step(&out, &Step::All(i), sample()).unwrap();
        for shape in [vec![2, 60], vec![2, 4, 15], vec![2, 2, 2, 3, 5]] {
            let got = s
                .step(
                    &out.reshape(shape.clone()).unwrap(),
                    &Step::Each(vec![i, i]),
                    &sample().reshape(shape.clone()).unwrap(),
                )
                .unwrap();
            assert_eq!(got.dims(), &shape[..]);
            let diff = max_diff(&got.reshape(want.dims()).unwrap(), &want);
            assert_eq!(diff, 0.0, "{} shape {shape:?}", case.name);
        }
    }
}

#[test]
fn x0_and_eps_recompose_the_sample() {
    for case in cases().iter().filter(|c| !c.name.contains("clip")) {
        let s = case.sampler();
        for &i in &case.recorded {
            let d = s
                .denoise(&model_output(i), &Step::All(i), sample())
                .unwrap();
            let step = Step::All(i);
            // The UNet's input is variance preserving: x_in = sqrt(a) x0 + sqrt(1 - a) eps.
            let x_in = s.scale_model_input(sample(), &step).unwrap();
            let a = match case.euler {
                true => {
                    let e = Euler::new(&case.config, case.steps).unwrap();
                    let sigma = f64::from(e.sigmas()[i]);
                    1.0 / (sigma * sigma + 1.0)
                }
                false => {
                    let d = Ddim::new(&case.config, case.steps).unwrap();
                    f64::from(d.alpha_prods(i).unwrap().0)
                }
            };
            let back =
                ((&d.x0 * a.sqrt()).unwrap() + (&d.eps * (1.0 - a).sqrt()).unwrap()).unwrap();
            let diff = max_diff(&back, &x_in);
            assert!(
                diff < 1e-5,
                "{} step {i}: |recomposed - x| = {diff:e}",
                case.name
            );
            if s.prediction_type() == PredictionType::Epsilon {
                assert_eq!(max_diff(&d.eps, &model_output(i)), 0.0);
            }
        }
    }
}

#[test]
fn classifier_free_guidance_matches_the_sdxl_pipeline() {
    let (uncond, cond) = (model_output(0), model_output(1));
    let got = guide(&uncond, &cond, &Batch::All(7.5)).unwrap();
    assert_each("guidance 7.5", &got, want("cfg_7_5"));
    let got = guide(&uncond, &cond, &Batch::Each(vec![2.0, 5.0])).unwrap();
    assert_each("guidance per sample", &got, want("cfg_each"));
    assert!(guide(&uncond, &cond, &Batch::Each(vec![2.0, 3.0, 4.0])).is_err());
    assert!(guide(&uncond, &cond.narrow(0, 0, 1).unwrap(), &Batch::All(2.0)).is_err());
}

#[test]
fn gradients_reach_the_prediction_through_guidance_and_denoising() {
    let e = Euler::new(&SchedulerConfig::sdxl(), 20).unwrap();
    let cond = Var::from_tensor(&model_output(1)).unwrap();
    let g = guide(&model_output(0), cond.as_tensor(), &Batch::All(5.0)).unwrap();
    let d = e.denoise(&g, &Step::Each(vec![3, 7]), sample()).unwrap();
    let grads = d.x0.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let grad = grads
        .get(cond.as_tensor())
        .expect("a gradient for the prediction");
    assert!(max_abs(grad) > 0.0);
}

#[test]
fn results_come_back_in_the_callers_dtype() {
    let e = Euler::new(&SchedulerConfig::sdxl(), 20).unwrap();
    let x = sample().to_dtype(DType::BF16).unwrap();
    let out = model_output(0).to_dtype(DType::BF16).unwrap();
    let step = Step::All(0);
    assert_eq!(e.step(&out, &step, &x).unwrap().dtype(), DType::BF16);
    assert_eq!(e.scale_model_input(&x, &step).unwrap().dtype(), DType::BF16);
    assert_eq!(e.denoise(&out, &step, &x).unwrap().x0.dtype(), DType::F32);
}

#[test]
fn the_built_in_sdxl_config_is_sdxl_base_file() {
    let file = SchedulerConfig::load(&fixtures("sdxl_scheduler_config.json")).unwrap();
    assert_eq!(SchedulerConfig::sdxl(), file);
    assert_eq!(file.class_name.as_deref(), Some("EulerDiscreteScheduler"));
    assert_eq!(file.steps_offset, Some(1));
    // The first case is SDXL's own sampler, read from the full config diffusers built.
    let case = &cases()[0];
    assert_eq!(case.name, "euler_eps_leading_20");
    let e = Euler::new(&SchedulerConfig::sdxl(), 20).unwrap();
    assert_eq!(
        e.sigmas(),
        Euler::new(&case.config, 20).unwrap().sigmas(),
        "SDXL's file and diffusers' full config give the same sampler"
    );
}

#[test]
fn bad_step_indices_and_batch_sizes_are_refused() {
    for case in cases() {
        let s = case.sampler();
        let out = model_output(0);
        let n = case.steps;
        assert!(
            s.step(&out, &Step::All(n), sample()).is_err(),
            "{}",
            case.name
        );
        assert!(s.timestep(n).is_err());
        assert!(s.scale_model_input(sample(), &Step::All(n)).is_err());
        assert!(s.step(&out, &Step::Each(vec![0, 1, 2]), sample()).is_err());
        assert!(s
            .timestep_input(&Step::Each(vec![0]), 2, &Device::Cpu)
            .is_err());
        let half = out.narrow(0, 0, 1).unwrap();
        assert!(s.step(&half, &Step::All(0), sample()).is_err());
    }
    for bad in [0, 1001] {
        assert!(Euler::new(&SchedulerConfig::sdxl(), bad).is_err());
        assert!(Ddim::new(&SchedulerConfig::sdxl(), bad).is_err());
    }
    // Leading spacing with steps_offset 1 at 1000 steps would index timestep 1000.
    assert!(Ddim::new(&SchedulerConfig::sdxl(), 1000).is_err());
    // numpy makes 62 trailing timesteps for 61 steps, the last -1; diffusers keeps them.
    let mut trailing = SchedulerConfig::sdxl();
    trailing.timestep_spacing = Some("trailing".into());
    for n in [61, 103] {
        let e = Euler::new(&trailing, n).unwrap_err().to_string();
        assert!(e.contains("timestep_spacing"), "{e}");
        assert!(Ddim::new(&trailing, n).is_err());
    }
    assert_eq!(Euler::new(&trailing, 60).unwrap().timesteps()[59], 16.0);
}

/// `(field, JSON value, which schedulers refuse it)`.
const UNSUPPORTED: &[(&str, &str, bool, bool)] = &[
    ("beta_schedule", r#""squaredcos_cap_v2""#, true, true),
    ("trained_betas", "[0.1, 0.2]", true, true),
    ("prediction_type", r#""sample""#, true, true),
    ("timestep_spacing", r#""karras""#, true, true),
    ("rescale_betas_zero_snr", "true", true, true),
    ("use_karras_sigmas", "true", true, false),
    ("use_exponential_sigmas", "true", true, false),
    ("use_beta_sigmas", "true", true, false),
    ("interpolation_type", r#""log_linear""#, true, false),
    ("timestep_type", r#""continuous""#, true, false),
    ("final_sigmas_type", r#""sigma_min""#, true, false),
    ("thresholding", "true", false, true),
    // A value of the wrong type names its field too.
    ("steps_offset", r#""one""#, true, true),
    ("num_train_timesteps", "-5", true, true),
    ("set_alpha_to_one", "1", true, true),
];

#[test]
fn unsupported_configs_are_refused_naming_the_field() {
    for &(field, value, euler_refuses, ddim_refuses) in UNSUPPORTED {
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures("sdxl_scheduler_config.json")).unwrap(),
        )
        .unwrap();
        json[field] = serde_json::from_str(value).unwrap();
        let text = json.to_string();
        let path = scratch("sampling-config").join("scheduler_config.json");
        std::fs::write(&path, &text).unwrap();
        let results = match SchedulerConfig::load(&path) {
            // A wrong type is refused on reading, naming the file and the field.
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("`{field}`")), "{field}: {msg}");
                assert!(msg.contains("scheduler_config.json"), "{field}: {msg}");
                continue;
            }
            Ok(cfg) => [
                (euler_refuses, "Euler", Euler::new(&cfg, 20).err()),
                (ddim_refuses, "DDIM", Ddim::new(&cfg, 20).err()),
            ],
        };
        for (refuses, class, err) in results {
            match (refuses, err) {
                (true, Some(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!("`{field}`")),
                        "{class} {field}: {msg}"
                    );
                }
                (true, None) => panic!("{class} accepted {field} = {value}"),
                // Fields of the other class are ignored, as diffusers does.
                (false, Some(e)) => panic!("{class} refused {field} = {value}: {e}"),
                (false, None) => {}
            }
        }
    }
}

#[test]
fn missing_fields_take_each_schedulers_own_defaults() {
    let cfg = SchedulerConfig::from_json("{}").unwrap();
    // Euler: linspace spacing, no offset, diffusers' linear betas 1e-4..0.02.
    let e = Euler::new(&cfg, 20).unwrap();
    assert_eq!(e.timesteps()[0], 999.0);
    assert_eq!(e.timesteps()[19], 0.0);
    assert_eq!(
        e.schedule(),
        &NoiseSchedule::new(1000, 0.0001, 0.02, BetaSchedule::Linear).unwrap()
    );
    // DDIM: leading spacing, x0 clipped to [-1, 1], final alpha 1.
    let d = Ddim::new(&cfg, 20).unwrap();
    assert_eq!(d.timesteps()[0], 950);
    assert_eq!(d.alpha_prods(19).unwrap().1, 1.0);
    let x0 = d
        .denoise(&model_output(0), &Step::All(0), sample())
        .unwrap()
        .x0;
    assert!(max_abs(&x0) <= 1.0, "clip_sample defaults to true for DDIM");
}
