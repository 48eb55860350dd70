//! Distillation training: the student (Qwen3 + LoRA + resampler) learns to reproduce the
//! teacher's outputs. [`config`] holds every setting and its default; [`Trainer`] is one step
//! at a time; [`run`] is the whole run (data order, evaluation, metrics, checkpoints, resume)
//! that every host drives, with targets from a cache or from the host itself.

pub mod config;
pub mod optim;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod trainer;
pub mod vision;

pub use config::{TargetDims, TrainConfig};
pub use run::{Resume, Run, RunSpec};
pub use schedule::Schedule;
pub use trainer::{EvalMetrics, Loss, SaveSizes, StepReport, Trainer};
