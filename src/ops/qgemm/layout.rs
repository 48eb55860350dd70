//! The one layout weights and activations share inside the integer kernels.
//!
//! Every GGUF block type is read as `w = scale * q - min`, with 8-bit `q`, a scale per
//! [`GROUP`] values and a minimum per group (the K-quants' sub-blocks are 16 or 32 values,
//! the older types' blocks 32). The kernels multiply 4 bytes into one 32-bit lane, so scales
//! are stored per lane of [`LANE`] values: one vector load gives each lane its scale.

/// Values per 32-bit lane of the integer dot products.
pub const LANE: usize = 4;
/// Values sharing one weight scale and minimum: the smallest sub-block of any type.
pub const GROUP: usize = 16;
/// Row lengths are padded (with zeros) to a multiple of this: one 512-bit step.
pub const K_STEP: usize = 64;
/// Group counts are padded to a multiple of this: one 512-bit vector of f32 minimums.
pub const GROUP_STEP: usize = 16;

pub fn k_padded(k: usize) -> usize {
    k.div_ceil(K_STEP) * K_STEP
}

pub fn groups_padded(k: usize) -> usize {
    (k / GROUP).div_ceil(GROUP_STEP) * GROUP_STEP
}
