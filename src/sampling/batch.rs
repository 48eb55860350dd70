//! One value for the whole batch, or one per sample (step indices, guidance scales), and the
//! float32 coefficient tensors that carry such values across a batch of any shape.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// A value shared by the whole batch or one per sample (along dimension 0).
#[derive(Debug, Clone, PartialEq)]
pub enum Batch<T> {
    All(T),
    Each(Vec<T>),
}

/// A denoising step index (`0..num_steps`), shared or per sample.
pub type Step = Batch<usize>;

impl<T> From<T> for Batch<T> {
    fn from(v: T) -> Self {
        Batch::All(v)
    }
}

impl<T: Copy> Batch<T> {
    pub fn values(&self) -> &[T] {
        match self {
            Batch::All(v) => std::slice::from_ref(v),
            Batch::Each(v) => v,
        }
    }

    /// Applies `f` to every value, keeping the layout.
    pub fn try_map<U>(&self, mut f: impl FnMut(T) -> Result<U>) -> Result<Batch<U>> {
        Ok(match self {
            Batch::All(v) => Batch::All(f(*v)?),
            Batch::Each(v) => Batch::Each(v.iter().map(|&x| f(x)).collect::<Result<_>>()?),
        })
    }

    /// The value for every one of `batch` samples.
    pub fn expand(&self, batch: usize) -> Result<Vec<T>> {
        match self {
            Batch::All(v) => Ok(vec![*v; batch]),
            Batch::Each(v) if v.len() == batch => Ok(v.clone()),
            Batch::Each(v) => Err(Error::Invalid(format!(
                "{} per-sample values for a batch of {batch}",
                v.len()
            ))),
        }
    }
}

impl Batch<f32> {
    /// A float32 tensor that broadcasts against `like`: shape `[1, 1, ..]` for a shared value,
    /// `[B, 1, ..]` for per-sample values (`like` must then have `B` rows).
    pub fn coeff(&self, like: &Tensor) -> Result<Tensor> {
        let rank = like.rank();
        let values = match self {
            Batch::All(v) => vec![*v],
            Batch::Each(v) => {
                let rows = like.dims().first().copied().unwrap_or(0);
                if rank == 0 || rows != v.len() {
                    return Err(Error::Invalid(format!(
                        "{} per-sample values for a tensor of shape {:?}",
                        v.len(),
                        like.dims()
                    )));
                }
                v.clone()
            }
        };
        let mut shape = vec![1usize; rank.max(1)];
        shape[0] = values.len();
        let t = Tensor::from_vec(values, shape, like.device())?;
        Ok(if rank == 0 { t.squeeze(0)? } else { t })
    }
}

/// `x` as float32 (a no-op when it already is).
pub(crate) fn as_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}
