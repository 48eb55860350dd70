//! ggml tensor types by name: for messages, for the `--type` options, and llama.cpp's
//! `general.file_type`.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Name of a ggml tensor type id (the ones candle cannot read included, for messages).
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The name llama.cpp uses for a candle type.
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The types candle reads, for the error about a file holding another one.
pub(super) const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (as in Q4_K_M, Q5_K_M, Q6_K, Q8_0 files)";

/// True for the float types that are read into dense tensors instead of quantized blocks.
pub fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// `q4_k`, `q5_k`, `q6_k`, `q8_0`, `q4_0`, `f16`, `f32`.
pub fn parse_type(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_k" | "q4k" => GgmlDType::Q4K,
        "q5_k" | "q5k" => GgmlDType::Q5K,
        "q6_k" | "q6k" => GgmlDType::Q6K,
        "q8_0" | "q80" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "f16" => GgmlDType::F16,
        "f32" => GgmlDType::F32,
        other => {
            return Err(Error::Invalid(format!(
                "unknown quantization type \"{other}\" (q4_k, q5_k, q6_k, q8_0, q4_0, f16, f32)"
            )))
        }
    })
}

/// llama.cpp's `general.file_type` for a file whose weight matrices are mostly of type `t`.
pub fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        _ => 0,
    }
}
