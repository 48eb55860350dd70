//! The deterministic train / held-out split of a cache's captions.

/// [`TargetCache::split`](super::TargetCache::split) for `n` items.
pub fn split_indices(n: usize, held_out: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let frac = if held_out.is_finite() {
        held_out.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut n_held = (n as f64 * frac).round() as usize;
    if frac > 0.0 && n >= 2 {
        n_held = n_held.clamp(1, n - 1);
    } else if n < 2 {
        n_held = 0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    crate::rng::Rng::new(seed).shuffle(&mut order);
    let mut held: Vec<usize> = order[..n_held].to_vec();
    let mut train: Vec<usize> = order[n_held..].to_vec();
    held.sort_unstable();
    train.sort_unstable();
    (train, held)
}
