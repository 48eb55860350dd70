//! SDXL's denoising UNet, frozen and differentiable with respect to its inputs, for
//! vision-based distillation: the student's conditioning is judged by what this UNet
//! predicts with it, so gradients must flow from the prediction back to
//! `encoder_hidden_states` and the pooled `text_embeds` (and the latents if asked), and to
//! no weight.
//!
//! Files, one job each:
//! - [`config`]: diffusers' `unet/config.json`, checked and resolved per block;
//! - [`schema`]: the architecture walked once per config, every module named in the diffusers
//!   and the single-file (LDM) layout, and the tensor table both loaders read;
//! - [`load`]: diffusers folders (single, sharded, `.fp16` variant) and single-file
//!   checkpoints (config inferred from shapes), with errors that name the file, the tensor
//!   and the model family;
//! - `layers`, `embeddings`, `resnet`, `transformer`, `model`: the network, matching
//!   diffusers' `UNet2DConditionModel` module for module;
//! - `checkpoint`: recomputation by block in the backward pass.
//!
//! The kernels are in [`crate::ops`]: [`crate::ops::frozen_conv2d`] (im2col + BLAS, input
//! gradient only), [`crate::ops::full_attention`] (fused unmasked attention),
//! [`crate::ops::group_norm`] (fused group norm + SiLU), the frozen linear and layer norm.
//!
//! # Memory
//! Recomputation by block ([`UNet::set_checkpointing`], on by default) bounds what the
//! autograd graph keeps to the blocks' inputs and outputs. Measured (peak RSS) for one
//! forward + backward of the SDXL base shape (random f32 weights: 9.8 GiB resident) at
//! 256 px (latents `[1, 4, 32, 32]`), 77 conditioning tokens, gradients for the conditioning
//! and the pooled vector, on a 2-core AMD EPYC with OpenBLAS:
//!
//! | | graph kept after the forward | peak above the loaded model |
//! |---|---|---|
//! | recomputation on | 43 MiB | 98 MiB |
//! | recomputation off | 1146 MiB | 1194 MiB |
//! | fast forward (inference, no graph) | - | 45 MiB |
//!
//! The price is one more forward of each block during the backward: about 30 CPU-seconds
//! instead of 21 for that forward + backward (forward 8, backward 13, recomputation 9; CPU
//! time, as wall time on that shared machine varied twofold). Reproduce with
//! `cargo test --release --test unet sdxl_shaped -- --ignored --nocapture`.

mod checkpoint;
pub mod config;
mod embeddings;
mod layers;
pub mod load;
mod model;
mod resnet;
pub mod schema;
mod transformer;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use config::{PerBlock, UNetConfig};
pub use embeddings::timestep_embedding;
pub use load::UNetOrigin;
pub use model::{UNet, UNetConditioning};

use crate::error::{Error, Result};
use load::Source;
use schema::Layout;

impl UNet {
    /// Loads a UNet from a diffusers `unet/` folder (or a pipeline folder holding one), or a
    /// single-file SDXL checkpoint (config inferred from its shapes). Weights are converted to
    /// `dtype` on `device`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::open(path, None, dtype, device)
    }

    /// [`UNet::load`] of a single-file checkpoint with an explicit config (a model whose head
    /// count or time-id width differ from SDXL's, which a single file does not record);
    /// folders use their own `config.json`.
    pub fn load_with_config(
        path: &Path,
        cfg: &UNetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::open(path, Some(cfg), dtype, device)
    }

    fn open(path: &Path, cfg: Option<&UNetConfig>, dtype: DType, device: &Device) -> Result<Self> {
        let opened = load::open(path, cfg, dtype, device)?;
        let layout = Layout::new(&opened.config);
        let src = Source::new(&layout, |spec| opened.fetch(spec));
        Self::build(
            opened.config.clone(),
            &src,
            dtype,
            device,
            opened.origin.clone(),
        )
    }

    /// A UNet from tensors under their diffusers names (the generators' way in), converted to
    /// `dtype` on `device`.
    pub fn from_tensors(
        cfg: &UNetConfig,
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate().map_err(Error::Invalid)?;
        let layout = Layout::new(cfg);
        let origin = Path::new("<memory>");
        let src = Source::new(&layout, |spec| {
            let t = tensors
                .get(&spec.name)
                .ok_or_else(|| Error::MissingTensor {
                    path: origin.to_path_buf(),
                    name: spec.name.clone(),
                })?;
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::Shape {
                    path: origin.to_path_buf(),
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    got: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        });
        Self::build(cfg.clone(), &src, dtype, device, UNetOrigin::Memory)
    }
}
