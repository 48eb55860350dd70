//! Whether the student maps different prompts to nearly the same conditioning (the collapse
//! output matching alone leads to): the mean pairwise cosine similarity between the
//! conditionings of different prompts, for the student next to the teacher. A student whose
//! value is above the teacher's puts different prompts closer together than the teacher does.
//!
//! A prompt's conditioning is summarised as its prompt embeddings averaged over the tokens,
//! followed by its pooled vector: small enough to keep for every held-out prompt.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// One vector per prompt of a batch: `[n, seq, embed]` + `[n, pooled]` -> `n` vectors.
pub fn summaries(embeds: &Tensor, pooled: &Tensor) -> Result<Vec<Vec<f32>>> {
    let mean = embeds.to_dtype(DType::F32)?.mean(1)?;
    let both = Tensor::cat(&[&mean, &pooled.to_dtype(DType::F32)?], 1)?;
    Ok(both.to_vec2::<f32>()?)
}

/// The mean cosine similarity over all pairs of different vectors (0 with fewer than two).
pub fn pairwise_cosine(vectors: &[Vec<f32>]) -> f64 {
    let unit: Vec<Vec<f64>> = vectors
        .iter()
        .map(|v| {
            let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            v.iter().map(|x| *x as f64 / norm.max(1e-12)).collect()
        })
        .collect();
    let (mut sum, mut pairs) = (0.0, 0usize);
    for i in 0..unit.len() {
        for j in i + 1..unit.len() {
            sum += unit[i]
                .iter()
                .zip(&unit[j])
                .map(|(a, b)| a * b)
                .sum::<f64>();
            pairs += 1;
        }
    }
    if pairs == 0 {
        0.0
    } else {
        sum / pairs as f64
    }
}
