//! The run folder, the same for every host:
//!
//! - `checkpoint.safetensors`: the latest checkpoint (weights, AdamW moments, accumulated
//!   gradients, counters, settings, data order), replaced atomically;
//! - `adapter/`: the adapter as of that checkpoint (what encoders load);
//! - `metrics.jsonl`: one line per optimizer step, evaluation and event;
//! - `loss.png`: training loss (blue) and held-out MSE (red) against the step.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::super::plot::{render_loss_rgb, write_loss_png, LossImage, Series};
use crate::error::{Error, Result};
use crate::formats::atomic::remove_stale_temps;
use crate::formats::safetensors::write_atomic;

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PNG: &str = "loss.png";
pub const ADAPTER_DIR: &str = crate::adapter::NESTED_DIR;

const TRAIN_RGB: [u8; 3] = [30, 90, 200];
const EVAL_RGB: [u8; 3] = [210, 40, 40];

pub struct RunFolder {
    dir: PathBuf,
    metrics: Option<File>,
}

impl RunFolder {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            metrics: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn checkpoint(&self) -> PathBuf {
        checkpoint_path(&self.dir)
    }

    pub fn adapter(&self) -> PathBuf {
        self.dir.join(ADAPTER_DIR)
    }

    fn metrics_path(&self) -> PathBuf {
        self.dir.join(METRICS_FILE)
    }

    /// Creates the folder; a fresh run starts its metrics over, a resumed one drops the lines
    /// past its checkpoint's `step` (they are about to be trained again). The temporary files
    /// of a killed run go: every file here is replaced atomically, so their targets are whole.
    pub fn open(&mut self, resumed_at: Option<u64>) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        remove_stale_temps(&self.dir, |_| true)?;
        remove_stale_temps(&self.adapter(), |_| true)?;
        let path = self.metrics_path();
        match resumed_at {
            Some(step) => truncate_metrics(&path, step)?,
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(&path, e))
                }
                _ => {}
            },
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        self.metrics = Some(file);
        Ok(())
    }

    pub fn log(&mut self, line: serde_json::Value) -> Result<()> {
        let path = self.metrics_path();
        let file = self
            .metrics
            .as_mut()
            .expect("the run folder is opened before anything is logged");
        // One write per line: a kill cannot interleave it with the next (a cut line is
        // dropped on resume, see `truncate_metrics`).
        file.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| Error::io(&path, e))
    }

    /// Redraws `loss.png` from `metrics.jsonl`.
    pub fn refresh_plot(&self) -> Result<()> {
        let (train, eval) = self.loss_series();
        write_loss_png(&self.dir.join(LOSS_PNG), &series(&train, &eval))
    }

    /// The same picture as `loss.png`, as RGB pixels (hosts show it without a file).
    pub fn loss_image(&self) -> LossImage {
        let (train, eval) = self.loss_series();
        render_loss_rgb(&series(&train, &eval))
    }

    /// (step, training loss) and (step, held-out MSE) from the metrics.
    fn loss_series(&self) -> (Vec<Point>, Vec<Point>) {
        let text = std::fs::read_to_string(self.metrics_path()).unwrap_or_default();
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
                continue;
            };
            if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
                train.push((step, l));
            }
            if let Some(e) = v.get("eval") {
                let m = |k: &str| e.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
                eval.push((step, m("mse_embeds") + m("mse_pooled")));
            }
        }
        (train, eval)
    }
}

type Point = (f64, f64);

fn series<'a>(train: &'a [Point], eval: &'a [Point]) -> [Series<'a>; 2] {
    [
        Series {
            points: train,
            rgb: TRAIN_RGB,
        },
        Series {
            points: eval,
            rgb: EVAL_RGB,
        },
    ]
}

pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// Drops metric lines past `step` so a resumed run does not repeat them, and the line a kill
/// cut short (it is not JSON).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v.get("step")
                    .and_then(|s| s.as_u64())
                    .is_none_or(|s| s <= step)
            })
        })
        .collect();
    write_atomic(path, (kept.join("\n") + "\n").as_bytes())
}
