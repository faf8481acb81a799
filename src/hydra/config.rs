//! Adapter configuration (serde) and initialisation.
//!
//! Defaults follow the paper's NLU setting: a parallel branch of rank 4 and a
//! sequential branch of rank 8, scale 1, kaiming-uniform `A`, zero `B`, no
//! branch biases, no dropout.

use alloc::format;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::MAX_RANK;
use crate::rng::Rng;

/// Which branches an adapter has (the paper's ablations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Parallel and sequential branches.
    Hydra,
    /// Parallel branch only (classic LoRA).
    Lora,
    /// Sequential branch only.
    #[serde(rename = "seqlora")]
    SeqLora,
}

impl Variant {
    /// Whether the variant has a parallel branch.
    pub fn has_parallel(self) -> bool {
        matches!(self, Variant::Hydra | Variant::Lora)
    }
    /// Whether the variant has a sequential branch.
    pub fn has_sequential(self) -> bool {
        matches!(self, Variant::Hydra | Variant::SeqLora)
    }
}

/// How `A` is drawn (`B` always starts at zero, so a fresh adapter is the identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// `U(−1/√fan_in, 1/√fan_in)`: PyTorch's `kaiming_uniform_(a=√5)`, LoRA's choice.
    KaimingUniform,
    /// `U(−√(6/(fan_in+fan_out)), +…)`.
    XavierUniform,
}

/// One low-rank branch: rank, scale, input dropout, biases.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BranchConfig {
    /// Rank `r` (1 ≤ r ≤ min(in, out, 64)).
    pub rank: usize,
    /// Scale `s` applied to the branch output.
    pub scale: f32,
    /// Dropout probability on the branch input while training (0 ≤ p < 1).
    pub dropout: f32,
    /// Biases on the down (r) and up (out) projections, initialised to zero.
    pub bias: bool,
}

impl Default for BranchConfig {
    fn default() -> Self {
        BranchConfig { rank: 4, scale: 1.0, dropout: 0.0, bias: false }
    }
}

/// Everything that defines an adapter layer besides the frozen weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HydraConfig {
    /// Hydra, LoRA or SeqLoRA.
    pub variant: Variant,
    /// The parallel branch (`p = s_p·B_p·A_p·x`), used by Hydra and LoRA.
    pub parallel: BranchConfig,
    /// The sequential branch (`q = s_s·B_s·A_s·y0`), used by Hydra and SeqLoRA.
    pub sequential: BranchConfig,
    /// Initialisation of `A`.
    pub init: Init,
    /// Seed of initialisation and dropout.
    pub seed: u64,
}

impl Default for HydraConfig {
    fn default() -> Self {
        HydraConfig {
            variant: Variant::Hydra,
            parallel: BranchConfig { rank: 4, ..BranchConfig::default() },
            sequential: BranchConfig { rank: 8, ..BranchConfig::default() },
            init: Init::KaimingUniform,
            seed: 0,
        }
    }
}

impl HydraConfig {
    /// Checks the configuration against a layer of shape `out×in`.
    pub fn validate(&self, in_dim: usize, out_dim: usize) -> Result<()> {
        if in_dim == 0 || out_dim == 0 {
            return Err(Error::Config(format!("layer shape {out_dim}×{in_dim} is empty")));
        }
        let max = in_dim.min(out_dim).min(MAX_RANK);
        for (name, on, b) in [
            ("parallel", self.variant.has_parallel(), &self.parallel),
            ("sequential", self.variant.has_sequential(), &self.sequential),
        ] {
            if !on {
                continue;
            }
            if b.rank == 0 || b.rank > max {
                return Err(Error::Config(format!(
                    "{name} rank {} must be in 1..={max} (min(in={in_dim}, out={out_dim}, {MAX_RANK})): pass a rank of at most {max}, or leave this {in_dim}→{out_dim} layer out of the targets (a classifier's logits layer often is this narrow; `--head new:N` trains a new one instead)",
                    b.rank
                )));
            }
            if !b.scale.is_finite() {
                return Err(Error::Config(format!("{name} scale {} is not finite", b.scale)));
            }
            if !(0.0..1.0).contains(&b.dropout) {
                return Err(Error::Config(format!(
                    "{name} dropout {} must be in [0, 1)",
                    b.dropout
                )));
            }
        }
        Ok(())
    }
}

/// `√x` for `x ≥ 0` without `std` (Newton's method from a bit-level guess;
/// exact to the last bit or one ulp, which is all an init bound needs).
pub(crate) fn sqrt(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return if x == 0.0 || x.is_infinite() { x } else { f64::NAN };
    }
    let mut y = f64::from_bits((x.to_bits() >> 1) + (1023u64 << 51));
    for _ in 0..6 {
        y = 0.5 * (y + x / y);
    }
    y
}

/// Fills `a` (`rows×fan_in`) from `init`.
pub(crate) fn init_a(a: &mut [f32], fan_in: usize, fan_out: usize, init: Init, rng: &mut Rng) {
    let bound = match init {
        Init::KaimingUniform => 1.0 / sqrt(fan_in as f64),
        Init::XavierUniform => sqrt(6.0 / (fan_in + fan_out) as f64),
    } as f32;
    for v in a {
        *v = rng.uniform(-bound, bound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqrt_matches_hardware() {
        for &x in &[0.0, 1e-300, 1e-9, 0.5, 1.0, 2.0, 3.0, 384.0, 1e12, 7.3e200] {
            let (s, t) = (sqrt(x), x.sqrt());
            assert!((s - t).abs() <= t * 1e-15, "{x}: {s} vs {t}");
        }
    }

    #[test]
    fn config_is_validated_against_the_layer() {
        let c = HydraConfig::default();
        assert!(c.validate(16, 16).is_ok());
        assert!(c.validate(16, 4).is_err(), "seq rank 8 > out 4");
        let mut c = HydraConfig { variant: Variant::Lora, ..HydraConfig::default() };
        assert!(c.validate(16, 4).is_ok(), "LoRA ignores the sequential rank");
        c.parallel.rank = 0;
        assert!(c.validate(16, 16).is_err());
        c.parallel.rank = 2;
        c.parallel.dropout = 1.0;
        assert!(c.validate(16, 16).is_err());
        c.parallel.dropout = 0.1;
        c.parallel.scale = f32::NAN;
        assert!(c.validate(16, 16).is_err());
    }
}
