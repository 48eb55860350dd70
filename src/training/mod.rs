//! Distillation training: the student (Qwen3 + LoRA + resampler) learns to reproduce the
//! teacher's cached outputs. [`Trainer`] is one step at a time; [`run`] is the whole loop over
//! a target cache with evaluation, metrics, checkpoints and resume.

pub mod optim;
pub mod schedule;
pub mod trainer;

pub use schedule::Schedule;
pub use trainer::{EvalMetrics, StepReport, TargetDims, TrainConfig, Trainer};
pub mod plot;
pub mod run;
