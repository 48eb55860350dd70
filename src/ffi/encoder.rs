//! Encoder exports: load from a JSON config, attach adapters, encode into caller buffers.

use std::ffi::c_char;
use std::path::PathBuf;
use std::sync::RwLock;

use candle_core::{DType, Device};
use once_cell::sync::Lazy;
use serde::Deserialize;

use super::boundary::{self, call, invalid, qwenclip_status, Failure, FfiResult};
use super::registry::Registry;
use crate::tokenizer::syntax::{PromptSyntax, WeightedPrompt};
use crate::{Encoder, EncoderOptions};

/// The JSON accepted by `qwenclip_encoder_load`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncoderSpec {
    /// Model folder or hub id.
    model: String,
    #[serde(default)]
    adapter: Option<PathBuf>,
    /// "cpu" (default), "cuda" or "cuda:N".
    #[serde(default = "cpu")]
    device: String,
    /// "f32" (default), "bf16" or "f16".
    #[serde(default = "f32")]
    dtype: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    hidden_layer: Option<i32>,
}

fn cpu() -> String {
    "cpu".into()
}
fn f32() -> String {
    "f32".into()
}

impl EncoderSpec {
    fn options(&self) -> FfiResult<EncoderOptions> {
        let device = parse_device(&self.device)?;
        let dtype = match self.dtype.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            o => {
                return Err(invalid(format!(
                    "config `dtype` is \"{o}\", expected \"f32\", \"bf16\" or \"f16\""
                )))
            }
        };
        Ok(EncoderOptions {
            device,
            dtype,
            max_tokens: self.max_tokens,
            hidden_layer: self.hidden_layer,
            ..Default::default()
        })
    }

    /// Loads (or reloads after an offload) the encoder; the temporaries of loading, which
    /// nothing will ask for again, are not kept for reuse.
    fn load(&self) -> FfiResult<Encoder> {
        let dir = crate::hub::resolve_model(&self.model)?;
        let loaded = Encoder::load(&dir, self.adapter.as_deref(), self.options()?);
        crate::allocator::release();
        Ok(loaded?)
    }
}

fn parse_device(s: &str) -> FfiResult<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse::<usize>)
                .map_err(|_| invalid(format!("config `device` \"{s}\" has a bad ordinal")))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(invalid(
                    "config `device` is cuda but this library was built without CUDA",
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| {
                Failure::new(
                    qwenclip_status::QWENCLIP_FAILED,
                    format!("cannot open {s}: {e}"),
                )
            })
        }
        o => Err(invalid(format!(
            "config `device` is \"{o}\", expected \"cpu\", \"cuda\" or \"cuda:N\""
        ))),
    }
}

/// An encoder behind a handle. `encoder` is `None` while offloaded (weights released); the
/// next encode reloads it from `spec` with the same adapter.
pub(super) struct Slot {
    spec: EncoderSpec,
    state: RwLock<State>,
}

struct State {
    encoder: Option<Encoder>,
    adapter: Option<PathBuf>,
}

impl Slot {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the loaded encoder, reloading it first if it was offloaded.
    pub(super) fn with<R>(&self, f: impl FnOnce(&Encoder) -> FfiResult<R>) -> FfiResult<R> {
        {
            let s = self.read();
            if let Some(e) = &s.encoder {
                return f(e);
            }
        }
        let mut s = self.write();
        if s.encoder.is_none() {
            let mut spec = self.spec.clone();
            spec.adapter = s.adapter.clone();
            s.encoder = Some(spec.load()?);
        }
        f(s.encoder.as_ref().expect("just loaded"))
    }

    fn with_mut<R>(&self, f: impl FnOnce(&mut Encoder) -> FfiResult<R>) -> FfiResult<R> {
        self.with(|_| Ok(()))?;
        let mut s = self.write();
        let r = f(s.encoder.as_mut().expect("loaded above"))?;
        s.adapter = s
            .encoder
            .as_ref()
            .and_then(|e| e.adapter_dir().map(PathBuf::from));
        Ok(r)
    }

    fn offload(&self) {
        self.write().encoder = None;
    }

    fn held(&self) -> Option<(usize, bool)> {
        self.read()
            .encoder
            .as_ref()
            .map(|e| (e.weight_bytes(), e.llm().device().is_cuda()))
    }
}

pub(super) static ENCODERS: Lazy<Registry<Slot>> = Lazy::new(|| Registry::new("encoder", 0x0E1C));

pub(crate) fn held_bytes() -> Vec<(usize, bool)> {
    ENCODERS.all().iter().filter_map(|s| s.held()).collect()
}

pub(crate) fn offload_all() -> FfiResult<()> {
    ENCODERS.all().iter().for_each(|s| s.offload());
    crate::allocator::release();
    Ok(())
}

/// Loads an encoder described by `config_json` and writes its handle to `*out_handle`.
///
/// `config_json`: `{"model": "<folder or hub id>", "adapter": "<folder>"|null,
/// "device": "cpu"|"cuda"|"cuda:N", "dtype": "f32"|"bf16"|"f16", "max_tokens": N|null,
/// "hidden_layer": N|null}`; only `model` is required; unknown keys are an error.
/// The handle must be released with `qwenclip_encoder_free`.
#[no_mangle]
pub extern "C" fn qwenclip_encoder_load(
    config_json: *const c_char,
    out_handle: *mut u64,
) -> qwenclip_status {
    call(|| {
        let text = boundary::str_arg(config_json, "config_json")?;
        let out = boundary::out_ptr(out_handle, "out_handle")?;
        let spec: EncoderSpec = boundary::json_arg(text, "encoder config")?;
        let encoder = spec.load()?;
        let adapter = encoder.adapter_dir().map(PathBuf::from);
        *out = ENCODERS.insert(Slot {
            spec,
            state: RwLock::new(State {
                encoder: Some(encoder),
                adapter,
            }),
        });
        Ok(())
    })
}

/// Frees an encoder. Freeing twice, or a handle that was never issued, is an error.
/// Waits for encodes running on it in other threads.
#[no_mangle]
pub extern "C" fn qwenclip_encoder_free(handle: u64) -> qwenclip_status {
    call(|| {
        drop(ENCODERS.remove(handle)?);
        crate::allocator::release();
        Ok(())
    })
}

/// Attaches the adapter in folder `adapter_dir` (bundle or bare PEFT LoRA), replacing the
/// current one without reloading the base model; NULL removes the adapter. On failure the
/// previous adapter stays.
#[no_mangle]
pub extern "C" fn qwenclip_encoder_load_adapter(
    handle: u64,
    adapter_dir: *const c_char,
) -> qwenclip_status {
    call(|| {
        let dir = boundary::opt_str_arg(adapter_dir, "adapter_dir")?;
        let slot = ENCODERS.get(handle)?;
        let set = slot.with_mut(|e| Ok(e.set_adapter(dir.map(std::path::Path::new))?));
        crate::allocator::release();
        set
    })
}

/// Releases the encoder's weights; the next call that needs them reloads them (same adapter).
#[no_mangle]
pub extern "C" fn qwenclip_encoder_offload(handle: u64) -> qwenclip_status {
    call(|| {
        ENCODERS.get(handle)?.offload();
        crate::allocator::release();
        Ok(())
    })
}

/// Output shape per prompt: `*seq` x `*embed` floats of prompt embeddings (77 x 2048 for
/// SDXL) and `*pooled` floats of pooled embedding (1280). Fails when the encoder has no
/// resampler (no adapter, or a bare LoRA).
#[no_mangle]
pub extern "C" fn qwenclip_encoder_output_shape(
    handle: u64,
    seq: *mut usize,
    embed: *mut usize,
    pooled: *mut usize,
) -> qwenclip_status {
    call(|| {
        let (s, e, p) = ENCODERS.get(handle)?.with(output_shape)?;
        *boundary::out_ptr(seq, "seq")? = s;
        *boundary::out_ptr(embed, "embed")? = e;
        *boundary::out_ptr(pooled, "pooled")? = p;
        Ok(())
    })
}

fn output_shape(enc: &Encoder) -> FfiResult<(usize, usize, usize)> {
    let r = enc.resampler().ok_or_else(|| {
        invalid(
            "this encoder has no resampler (load an adapter bundle): it cannot make conditioning",
        )
    })?;
    let c = r.config();
    Ok((c.num_latents, c.output_dim, c.pooled_dim))
}

/// Encodes `n_prompts` UTF-8 prompts in one batch. Writes `n * seq * embed` floats of prompt
/// embeddings (row-major `[n, seq, embed]`) to `embeds` and `n * pooled` floats to `pooled`;
/// `embeds_len` / `pooled_len` are the buffers' sizes in floats and must match exactly (see
/// `qwenclip_encoder_output_shape`). The buffers are owned by the caller and written once,
/// nothing else is allocated for them. A prompt cut at the token limit is not an error: it
/// leaves a warning in `qwenclip_last_warning()`.
#[no_mangle]
pub extern "C" fn qwenclip_encode(
    handle: u64,
    prompts: *const *const c_char,
    n_prompts: usize,
    embeds: *mut f32,
    embeds_len: usize,
    pooled: *mut f32,
    pooled_len: usize,
) -> qwenclip_status {
    call(|| {
        encode(
            handle,
            prompts,
            n_prompts,
            PromptSyntax::None,
            embeds,
            embeds_len,
            pooled,
            pooled_len,
        )
    })
}

/// `qwenclip_encode` for prompts written with weights. `syntax`: `"comfy"` (ComfyUI's
/// `CLIPTextEncode`: `(text)` x1.1, `(text:1.3)`, `\(` `\)` escapes), `"a1111"`
/// (AUTOMATIC1111's, also `[text]` /1.1) or `"none"`/NULL (plain text, as `qwenclip_encode`).
/// The syntax is removed before the LLM reads the prompt; each token's weight scales the
/// attention the resampler gives it. A malformed weight (not a number, negative, NaN,
/// infinite, over 100) is `QWENCLIP_INVALID_ARGUMENT` with a message naming the span.
#[no_mangle]
pub extern "C" fn qwenclip_encode_weighted(
    handle: u64,
    prompts: *const *const c_char,
    n_prompts: usize,
    syntax: *const c_char,
    embeds: *mut f32,
    embeds_len: usize,
    pooled: *mut f32,
    pooled_len: usize,
) -> qwenclip_status {
    call(|| {
        let syntax = syntax_arg(syntax)?;
        encode(
            handle, prompts, n_prompts, syntax, embeds, embeds_len, pooled, pooled_len,
        )
    })
}

/// How the library reads a weighted prompt, for a host to show or check: writes
/// `{"text": "<what the LLM reads>", "segments": [["<text>", weight], ...]}` (JSON, UTF-8,
/// NUL-terminated) into `buf` of `len` bytes; `*needed` gets the size required (call with
/// `buf` NULL and `len` 0 to ask). `syntax` as for `qwenclip_encode_weighted`.
#[no_mangle]
pub extern "C" fn qwenclip_prompt_weights(
    syntax: *const c_char,
    prompt: *const c_char,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> qwenclip_status {
    call(|| {
        let syntax = syntax_arg(syntax)?;
        let prompt = boundary::str_arg(prompt, "prompt")?;
        let parsed = WeightedPrompt::parse(prompt, syntax)?;
        let doc = serde_json::json!({"text": parsed.text(), "segments": parsed.segments});
        boundary::json_out(&doc, buf, len, needed)
    })
}

fn syntax_arg(syntax: *const c_char) -> FfiResult<PromptSyntax> {
    match boundary::opt_str_arg(syntax, "syntax")? {
        None => Ok(PromptSyntax::None),
        Some(s) => Ok(s.parse()?),
    }
}

#[allow(clippy::too_many_arguments)]
fn encode(
    handle: u64,
    prompts: *const *const c_char,
    n_prompts: usize,
    syntax: PromptSyntax,
    embeds: *mut f32,
    embeds_len: usize,
    pooled: *mut f32,
    pooled_len: usize,
) -> FfiResult<()> {
    let prompts = boundary::prompts_arg(prompts, n_prompts)?;
    ENCODERS.get(handle)?.with(|enc| {
        let (s, e, p) = output_shape(enc)?;
        let n = prompts.len();
        let embeds = boundary::buffer_mut(embeds, embeds_len, n * s * e, "embeds")?;
        let pooled = boundary::buffer_mut(pooled, pooled_len, n * p, "pooled")?;
        let c = enc.encode_with(&prompts, syntax)?;
        c.copy_to(embeds, pooled)?;
        boundary::set_warning(&c.warnings.join("\n"));
        Ok(())
    })
}
