//! The SDXL teacher as the target cache's source of truth.

use candle_core::Tensor;

use super::cache::TargetSource;
use crate::error::Result;
use crate::teacher::Teacher;

impl TargetSource for Teacher {
    fn fingerprint(&self) -> String {
        Teacher::fingerprint(self)
    }

    fn describe(&self) -> String {
        Teacher::describe(self)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    fn encode(&self, captions: &[&str]) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let out = Teacher::encode(self, captions)?;
        Ok((out.prompt_embeds, out.pooled, out.dropped_tokens))
    }
}
