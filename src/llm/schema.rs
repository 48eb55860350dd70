//! Every tensor of a Qwen3 checkpoint in one table: Hugging Face name, llama.cpp (GGUF) name,
//! shape and role. The loaders, the GGUF converter, `info`, LoRA naming and the random
//! generators read it, so that a name or a shape is written down once.

use super::config::Qwen3Config;
use Group::{Attention, Embeddings, Mlp, Norms};
use Param as P;
use Size::{Ffn, HeadDim, Hidden, KvWidth, QWidth, Vocab};

/// A size taken from the config.
#[derive(Debug, Clone, Copy)]
enum Size {
    Vocab,
    Hidden,
    Ffn,
    HeadDim,
    /// All query heads: `heads * head_dim`.
    QWidth,
    /// All key/value heads: `kv_heads * head_dim`.
    KvWidth,
}

impl Size {
    fn of(self, cfg: &Qwen3Config) -> usize {
        match self {
            Self::Vocab => cfg.vocab_size,
            Self::Hidden => cfg.hidden_size,
            Self::Ffn => cfg.intermediate_size,
            Self::HeadDim => cfg.head_dim(),
            Self::QWidth => cfg.num_attention_heads * cfg.head_dim(),
            Self::KvWidth => cfg.num_key_value_heads * cfg.head_dim(),
        }
    }
}

/// A decoder projection: what a LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

/// What a tensor is for. The per-layer ones exist once per decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Embedding,
    FinalNorm,
    /// Only in untied models: encoding never reads it, `quantize` carries it over.
    LmHead,
    InputNorm,
    PostAttentionNorm,
    QNorm,
    KNorm,
    Projection(Module),
}

/// The group `info` totals a tensor under; it also decides the quantization type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Embeddings,
    Attention,
    Mlp,
    Norms,
}

/// One row of the table; names leave out the `.weight` every Qwen3 tensor ends with.
struct Row {
    param: Param,
    hf: &'static str,
    gguf: &'static str,
    group: Group,
    shape: &'static [Size],
}

const fn row(
    param: Param,
    hf: &'static str,
    gguf: &'static str,
    group: Group,
    shape: &'static [Size],
) -> Row {
    Row {
        param,
        hf,
        gguf,
        group,
        shape,
    }
}

/// Model-wide tensors, full names.
#[rustfmt::skip]
const GLOBAL: [Row; 3] = [
    row(P::Embedding, "model.embed_tokens", "token_embd", Embeddings, &[Vocab, Hidden]),
    row(P::FinalNorm, "model.norm", "output_norm", Norms, &[Hidden]),
    row(P::LmHead, "lm_head", "output", Embeddings, &[Vocab, Hidden]),
];

/// Tensors of decoder layer N, under [`HF_LAYER`]`N.` and [`GGUF_LAYER`]`N.`, in the order of
/// a Hugging Face checkpoint. The random generators draw in this order: their bytes depend
/// on it.
#[rustfmt::skip]
const LAYER: [Row; 11] = [
    row(P::Projection(Module::QProj), "self_attn.q_proj", "attn_q", Attention, &[QWidth, Hidden]),
    row(P::Projection(Module::KProj), "self_attn.k_proj", "attn_k", Attention, &[KvWidth, Hidden]),
    row(P::Projection(Module::VProj), "self_attn.v_proj", "attn_v", Attention, &[KvWidth, Hidden]),
    row(P::Projection(Module::OProj), "self_attn.o_proj", "attn_output", Attention, &[Hidden, QWidth]),
    row(P::QNorm, "self_attn.q_norm", "attn_q_norm", Norms, &[HeadDim]),
    row(P::KNorm, "self_attn.k_norm", "attn_k_norm", Norms, &[HeadDim]),
    row(P::Projection(Module::GateProj), "mlp.gate_proj", "ffn_gate", Mlp, &[Ffn, Hidden]),
    row(P::Projection(Module::UpProj), "mlp.up_proj", "ffn_up", Mlp, &[Ffn, Hidden]),
    row(P::Projection(Module::DownProj), "mlp.down_proj", "ffn_down", Mlp, &[Hidden, Ffn]),
    row(P::InputNorm, "input_layernorm", "attn_norm", Norms, &[Hidden]),
    row(P::PostAttentionNorm, "post_attention_layernorm", "ffn_norm", Norms, &[Hidden]),
];

const HF_LAYER: &str = "model.layers.";
const GGUF_LAYER: &str = "blk.";

/// One tensor of a checkpoint for a given config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub param: Param,
    /// The decoder layer of a per-layer tensor.
    pub layer: Option<usize>,
    pub hf_name: String,
    pub gguf_name: String,
    /// Row-major (`[out, in]` for a projection).
    pub shape: Vec<usize>,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The Hugging Face (and PEFT `target_modules`) name: `q_proj` ... `down_proj`.
    pub fn name(self) -> &'static str {
        self.split().1
    }

    /// The sub-module it sits in: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        self.split().0
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// `model.layers.{layer}.self_attn.q_proj`: the weight is this plus `.weight`.
    pub fn path(self, layer: usize) -> String {
        format!("{HF_LAYER}{layer}.{}", row_of(P::Projection(self)).hf)
    }

    /// The inverse of [`Module::path`].
    pub fn parse_path(path: &str) -> Option<(usize, Self)> {
        let (layer, rest) = split_layer(path, HF_LAYER)?;
        let m = Self::ALL
            .into_iter()
            .find(|&m| row_of(P::Projection(m)).hf == rest)?;
        Some((layer, m))
    }

    fn split(self) -> (&'static str, &'static str) {
        row_of(P::Projection(self))
            .hf
            .split_once('.')
            .expect("projection rows are block.module")
    }
}

impl Param {
    pub fn group(self) -> Group {
        row_of(self).group
    }

    /// The llama.cpp name of a model-wide tensor; per-layer ones are in
    /// [`Qwen3Config::layer_tensor`].
    pub fn gguf_name(self) -> String {
        format!("{}.weight", row_of(self).gguf)
    }
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Self::Embeddings => "embeddings",
            Self::Attention => "attention",
            Self::Mlp => "mlp",
            Self::Norms => "norms",
        }
    }
}

impl Qwen3Config {
    /// Every tensor of a checkpoint of this shape, in Hugging Face's order (`lm_head` only
    /// when the embeddings are untied).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = vec![self.tensor(P::Embedding)];
        for i in 0..self.num_hidden_layers {
            out.extend(LAYER.iter().map(|r| self.layer_tensor(i, r.param)));
        }
        out.push(self.tensor(P::FinalNorm));
        if !self.tie_word_embeddings {
            out.push(self.tensor(P::LmHead));
        }
        out
    }

    /// A model-wide tensor (embedding, final norm, `lm_head`).
    pub fn tensor(&self, param: Param) -> TensorSpec {
        self.spec(param, None)
    }

    /// Tensor `param` of decoder layer `layer`.
    pub fn layer_tensor(&self, layer: usize, param: Param) -> TensorSpec {
        self.spec(param, Some(layer))
    }

    /// `[out, in]` of a decoder projection (`q_proj` ... `down_proj`).
    pub fn projection_shape(&self, module: &str) -> Option<(usize, usize)> {
        let m = Module::from_name(module)?;
        match row_of(P::Projection(m)).shape {
            [out, inp] => Some((out.of(self), inp.of(self))),
            _ => None,
        }
    }

    fn spec(&self, param: Param, layer: Option<usize>) -> TensorSpec {
        let r = row_of(param);
        let (hf, gguf) = match layer {
            Some(i) => (
                format!("{HF_LAYER}{i}.{}", r.hf),
                format!("{GGUF_LAYER}{i}.{}", r.gguf),
            ),
            None => (r.hf.to_string(), r.gguf.to_string()),
        };
        TensorSpec {
            param,
            layer,
            hf_name: hf + ".weight",
            gguf_name: gguf + ".weight",
            shape: r.shape.iter().map(|d| d.of(self)).collect(),
        }
    }
}

/// The parameter (and layer) a Hugging Face tensor name stands for.
pub fn parse_hf(name: &str) -> Option<(Param, Option<usize>)> {
    parse(name, HF_LAYER, |r| r.hf)
}

/// The parameter (and layer) a llama.cpp tensor name stands for.
pub fn parse_gguf(name: &str) -> Option<(Param, Option<usize>)> {
    parse(name, GGUF_LAYER, |r| r.gguf)
}

/// Hugging Face tensor name -> llama.cpp's.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    let (param, layer) = parse_hf(name)?;
    let r = row_of(param);
    Some(match layer {
        Some(i) => format!("{GGUF_LAYER}{i}.{}.weight", r.gguf),
        None => format!("{}.weight", r.gguf),
    })
}

fn parse(
    name: &str,
    layer_prefix: &str,
    name_of: fn(&Row) -> &'static str,
) -> Option<(Param, Option<usize>)> {
    let stem = name.strip_suffix(".weight")?;
    if let Some(r) = GLOBAL.iter().find(|r| name_of(r) == stem) {
        return Some((r.param, None));
    }
    let (layer, rest) = split_layer(stem, layer_prefix)?;
    let r = LAYER.iter().find(|r| name_of(r) == rest)?;
    Some((r.param, Some(layer)))
}

/// `prefix` `N.` `rest` -> `(N, rest)`.
fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

fn row_of(param: Param) -> &'static Row {
    GLOBAL
        .iter()
        .chain(&LAYER)
        .find(|r| r.param == param)
        .expect("every parameter has a row")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let cfg = crate::dev::tiny::shape("tiny").unwrap();
        let all = cfg.tensors();
        assert_eq!(all.len(), 2 + 11 * cfg.num_hidden_layers);
        for t in &all {
            assert_eq!(parse_hf(&t.hf_name), Some((t.param, t.layer)));
            assert_eq!(parse_gguf(&t.gguf_name), Some((t.param, t.layer)));
            assert_eq!(
                hf_to_gguf(&t.hf_name).as_deref(),
                Some(t.gguf_name.as_str())
            );
        }
        assert_eq!(
            hf_to_gguf("model.layers.1.self_attn.o_proj.weight").as_deref(),
            Some("blk.1.attn_output.weight")
        );
        assert_eq!(
            hf_to_gguf("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(hf_to_gguf("model.layers.1.self_attn.rotary.weight"), None);
    }

    #[test]
    fn module_paths_round_trip() {
        for m in Module::ALL {
            assert_eq!(Module::from_name(m.name()), Some(m));
            assert_eq!(Module::parse_path(&m.path(3)), Some((3, m)));
        }
        assert_eq!(Module::DownProj.path(2), "model.layers.2.mlp.down_proj");
    }
}
