//! Which captions a run trains on, and in what order: a seeded held-out split, then a fresh
//! shuffle of the training captions every epoch. Its whole state goes into checkpoints, so a
//! resumed run (on any host) draws exactly the batches an uninterrupted one would.

use serde::{Deserialize, Serialize};

use crate::data::split_indices;
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataOrder {
    rng: Rng,
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
    held_out: Vec<usize>,
}

impl DataOrder {
    /// The split and first epoch's order of `n` captions.
    pub fn new(n: usize, held_out: f64, seed: u64) -> Self {
        let (train, held_out) = split_indices(n, held_out, seed);
        let mut rng = Rng::new(seed ^ 0x5EED);
        let mut order = train;
        rng.shuffle(&mut order);
        Self {
            rng,
            order,
            pos: 0,
            epoch: 0,
            held_out,
        }
    }

    /// Training captions in this epoch's order.
    pub fn train(&self) -> &[usize] {
        &self.order
    }

    pub fn held_out(&self) -> &[usize] {
        &self.held_out
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether every index is below `n` (the order was made for a caption set this size).
    pub fn fits(&self, n: usize) -> bool {
        self.order.iter().chain(&self.held_out).all(|&i| i < n)
    }

    /// The next micro-batch and the order after it; `self` is unchanged until the caller
    /// keeps the returned order (a batch handed out but never trained on is drawn again).
    pub fn next_batch(&self, batch_size: usize) -> (Vec<usize>, DataOrder) {
        let mut next = self.clone();
        let mut batch = Vec::with_capacity(batch_size);
        while batch.len() < batch_size.min(next.order.len()) {
            if next.pos == next.order.len() {
                next.rng.shuffle(&mut next.order);
                next.pos = 0;
                next.epoch += 1;
            }
            batch.push(next.order[next.pos]);
            next.pos += 1;
        }
        (batch, next)
    }
}
