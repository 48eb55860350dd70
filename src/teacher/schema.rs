//! Every tensor of a CLIP text encoder in one table, named in both layouts SDXL ships:
//! Hugging Face `CLIPTextModel` (diffusers folders, and CLIP-L in single files) and
//! open_clip's `TextTransformer` (CLIP-G in single files). The model, the single-file reader
//! and the tiny generator read it.

use super::clip::ClipTextConfig;
use Dim::{Ffn, Hidden};
use LayerModule::*;
use OpenClipModule::{InProj, Named};

/// What a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    TokenEmbedding,
    PositionEmbedding,
    /// A tensor of a module of encoder layer `layer`.
    Layer {
        layer: usize,
        module: LayerModule,
        field: Field,
    },
    FinalNorm(Field),
    /// `text_projection` (CLIP-G): no bias.
    Projection,
}

/// The modules of one encoder layer, in checkpoint order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerModule {
    QProj,
    KProj,
    VProj,
    OutProj,
    Fc1,
    Fc2,
    LayerNorm1,
    LayerNorm2,
}

/// Linear and layer-norm modules each hold a weight and a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Weight,
    Bias,
}

/// Where open_clip keeps a tensor (names without the checkpoint's prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenClipKey {
    /// Under another name, same layout.
    Renamed(String),
    /// Rows `part` (0 = q, 1 = k, 2 = v) of torch's fused `in_proj` (`nn.MultiheadAttention`).
    InProj { key: String, part: usize },
    /// Transposed: open_clip computes `x @ text_projection`.
    Transposed(String),
}

/// A size taken from the config.
#[derive(Debug, Clone, Copy)]
enum Dim {
    Hidden,
    Ffn,
}

/// Where open_clip keeps a layer module (under [`OPEN_CLIP_LAYERS`]`N.`).
#[derive(Debug, Clone, Copy)]
enum OpenClipModule {
    InProj(usize),
    Named(&'static str),
}

/// A layer module: Hugging Face name (under [`HF_LAYERS`]`N.`), open_clip name, `[out, in]`
/// of its weight (a layer norm's is `[out]`).
struct Row {
    module: LayerModule,
    hf: &'static str,
    open_clip: OpenClipModule,
    out: Dim,
    inp: Option<Dim>,
}

#[rustfmt::skip]
const LAYER_MODULES: [Row; 8] = [
    Row { module: QProj, hf: "self_attn.q_proj", open_clip: InProj(0), out: Hidden, inp: Some(Hidden) },
    Row { module: KProj, hf: "self_attn.k_proj", open_clip: InProj(1), out: Hidden, inp: Some(Hidden) },
    Row { module: VProj, hf: "self_attn.v_proj", open_clip: InProj(2), out: Hidden, inp: Some(Hidden) },
    Row { module: OutProj, hf: "self_attn.out_proj", open_clip: Named("attn.out_proj"), out: Hidden, inp: Some(Hidden) },
    Row { module: Fc1, hf: "mlp.fc1", open_clip: Named("mlp.c_fc"), out: Ffn, inp: Some(Hidden) },
    Row { module: Fc2, hf: "mlp.fc2", open_clip: Named("mlp.c_proj"), out: Hidden, inp: Some(Ffn) },
    Row { module: LayerNorm1, hf: "layer_norm1", open_clip: Named("ln_1"), out: Hidden, inp: None },
    Row { module: LayerNorm2, hf: "layer_norm2", open_clip: Named("ln_2"), out: Hidden, inp: None },
];

/// Where the encoder layers are, in each layout.
pub const HF_LAYERS: &str = "text_model.encoder.layers.";
pub const OPEN_CLIP_LAYERS: &str = "transformer.resblocks.";

impl Param {
    /// The weight and the bias of a module of layer `layer`.
    pub fn module(layer: usize, module: LayerModule) -> [Param; 2] {
        [Field::Weight, Field::Bias].map(|field| Param::Layer {
            layer,
            module,
            field,
        })
    }

    pub fn final_norm() -> [Param; 2] {
        [Field::Weight, Field::Bias].map(Param::FinalNorm)
    }

    /// A layer norm's weight or bias.
    pub fn is_norm(self) -> bool {
        match self {
            Self::Layer { module, .. } => row(module).inp.is_none(),
            Self::FinalNorm(_) => true,
            _ => false,
        }
    }

    /// The name in a Hugging Face checkpoint.
    pub fn hf_name(self) -> String {
        match self {
            Self::TokenEmbedding => "text_model.embeddings.token_embedding.weight".into(),
            Self::PositionEmbedding => "text_model.embeddings.position_embedding.weight".into(),
            Self::Layer {
                layer,
                module,
                field,
            } => format!("{HF_LAYERS}{layer}.{}.{}", row(module).hf, field.name()),
            Self::FinalNorm(field) => format!("text_model.final_layer_norm.{}", field.name()),
            Self::Projection => "text_projection.weight".into(),
        }
    }

    /// Where open_clip keeps it.
    pub fn open_clip(self) -> OpenClipKey {
        match self {
            Self::TokenEmbedding => OpenClipKey::Renamed("token_embedding.weight".into()),
            Self::PositionEmbedding => OpenClipKey::Renamed("positional_embedding".into()),
            Self::Layer {
                layer,
                module,
                field,
            } => match row(module).open_clip {
                InProj(part) => OpenClipKey::InProj {
                    key: format!("{OPEN_CLIP_LAYERS}{layer}.attn.in_proj_{}", field.name()),
                    part,
                },
                Named(m) => {
                    OpenClipKey::Renamed(format!("{OPEN_CLIP_LAYERS}{layer}.{m}.{}", field.name()))
                }
            },
            Self::FinalNorm(field) => OpenClipKey::Renamed(format!("ln_final.{}", field.name())),
            Self::Projection => OpenClipKey::Transposed("text_projection".into()),
        }
    }

    /// The shape in Hugging Face orientation (`[out, in]` for a weight matrix).
    pub fn shape(self, cfg: &ClipTextConfig) -> Vec<usize> {
        let h = cfg.hidden_size;
        match self {
            Self::TokenEmbedding => vec![cfg.vocab_size, h],
            Self::PositionEmbedding => vec![cfg.max_position_embeddings, h],
            Self::Layer { module, field, .. } => {
                let r = row(module);
                match (field, r.inp) {
                    (Field::Weight, Some(inp)) => vec![r.out.of(cfg), inp.of(cfg)],
                    _ => vec![r.out.of(cfg)],
                }
            }
            Self::FinalNorm(_) => vec![h],
            Self::Projection => vec![cfg.projection_dim.unwrap_or_default(), h],
        }
    }
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Self::Weight => "weight",
            Self::Bias => "bias",
        }
    }
}

impl Dim {
    fn of(self, cfg: &ClipTextConfig) -> usize {
        match self {
            Self::Hidden => cfg.hidden_size,
            Self::Ffn => cfg.intermediate_size,
        }
    }
}

/// Every tensor of a full encoder for `cfg` in checkpoint order: `text_projection` when the
/// config has a `projection_dim`.
pub fn tensors(cfg: &ClipTextConfig) -> Vec<Param> {
    let mut out = vec![Param::TokenEmbedding, Param::PositionEmbedding];
    for layer in 0..cfg.num_hidden_layers {
        for r in &LAYER_MODULES {
            out.extend(Param::module(layer, r.module));
        }
    }
    out.extend(Param::final_norm());
    if cfg.projection_dim.is_some() {
        out.push(Param::Projection);
    }
    out
}

fn row(module: LayerModule) -> &'static Row {
    LAYER_MODULES
        .iter()
        .find(|r| r.module == module)
        .expect("every layer module has a row")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_name_every_tensor() {
        let q = Param::Layer {
            layer: 3,
            module: VProj,
            field: Field::Bias,
        };
        assert_eq!(
            q.hf_name(),
            "text_model.encoder.layers.3.self_attn.v_proj.bias"
        );
        assert_eq!(
            q.open_clip(),
            OpenClipKey::InProj {
                key: "transformer.resblocks.3.attn.in_proj_bias".into(),
                part: 2
            }
        );
        let [fc2, _] = Param::module(0, Fc2);
        assert_eq!(
            fc2.open_clip(),
            OpenClipKey::Renamed("transformer.resblocks.0.mlp.c_proj.weight".into())
        );
    }
}
