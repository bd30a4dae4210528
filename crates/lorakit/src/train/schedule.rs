//! Learning-rate schedules, identical to Hugging Face transformers' `LambdaLR` schedules:
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (with `num_cycles = 0.5`).
//!
//! transformers' `Trainer` calls `optimizer.step()` and then `scheduler.step()`, so the
//! update with 0-based index `k` uses `base_lr * lr_lambda(k)`. With warm-up this makes
//! the very first update's learning rate 0, exactly as in transformers.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScheduleKind {
    /// Linear warm-up, then constant (`get_constant_schedule_with_warmup`).
    Constant,
    /// Linear warm-up, then linear decay to 0 at `total_steps` (`get_linear_schedule_with_warmup`).
    #[default]
    Linear,
    /// Linear warm-up, then half a cosine down to 0 at `total_steps` (`get_cosine_schedule_with_warmup`).
    Cosine,
}

impl ScheduleKind {
    /// The names accepted by [`FromStr`], as written by [`fmt::Display`].
    pub const NAMES: [&'static str; 3] = ["constant", "linear", "cosine"];

    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScheduleKind {
    type Err = Error;

    /// Accepts `constant`, `linear`, `cosine` (any case), and transformers' names
    /// `constant_with_warmup`, which means the same as `constant` here.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::Invalid(format!(
                "unknown learning-rate schedule '{s}': expected one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

/// A learning-rate schedule: `lr_at(step) = base_lr * lambda(step)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    /// Number of optimiser updates in the whole run (transformers' `num_training_steps`).
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, base_lr: f64, warmup_steps: u64, total_steps: u64) -> Schedule {
        Schedule {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate for the optimiser update with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.lambda(step)
    }

    /// The multiplier of `base_lr` at `step`: the value of transformers' `lr_lambda`,
    /// computed with the same floating-point operations in the same order.
    pub fn lambda(&self, step: u64) -> f64 {
        let warmup = self.warmup_steps;
        if step < warmup {
            // float(current_step) / float(max(1, num_warmup_steps))
            return step as f64 / warmup.max(1) as f64;
        }
        // Python ints: differences may be negative (past the end of training).
        let after_warmup = (self.total_steps as i128 - warmup as i128).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                // max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))
                let remaining = (self.total_steps as i128 - step as i128) as f64;
                (remaining / after_warmup).max(0.0)
            }
            ScheduleKind::Cosine => {
                // progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
                // max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
                let num_cycles = 0.5f64;
                let progress = (step as i128 - warmup as i128) as f64 / after_warmup;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values come from the transformers formulas evaluated in Python (f64):
    //   warm-up:  step / max(1, warmup)
    //   linear:   max(0, (total - step) / max(1, total - warmup))
    //   cosine:   max(0, 0.5 * (1 + cos(pi * 0.5 * 2 * (step - warmup) / max(1, total - warmup))))

    #[test]
    fn parse_and_display() {
        assert_eq!(
            "linear".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Linear
        );
        assert_eq!(
            "Cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        assert_eq!(
            "constant".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Constant
        );
        assert_eq!(
            "constant_with_warmup".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Constant
        );
        let msg = "cosine_with_restarts"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cosine_with_restarts"), "{msg}");
        assert!(msg.contains("constant, linear, cosine"), "{msg}");
        for name in ScheduleKind::NAMES {
            assert_eq!(name.parse::<ScheduleKind>().unwrap().to_string(), name);
        }
    }

    #[test]
    fn warmup_is_shared_and_starts_at_zero() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = Schedule::new(kind, 2e-4, 4, 20);
            assert_eq!(s.lr_at(0), 0.0);
            assert_eq!(s.lr_at(1), 2e-4 * 0.25);
            assert_eq!(s.lr_at(2), 2e-4 * 0.5);
            assert_eq!(s.lr_at(3), 2e-4 * 0.75);
            // First step after warm-up: full learning rate for every kind.
            assert_eq!(s.lr_at(4), 2e-4, "{kind}");
        }
    }

    #[test]
    fn constant() {
        let s = Schedule::new(ScheduleKind::Constant, 1e-3, 0, 10);
        for step in [0, 1, 9, 10, 1000] {
            assert_eq!(s.lr_at(step), 1e-3);
        }
    }

    #[test]
    fn linear() {
        let s = Schedule::new(ScheduleKind::Linear, 1e-3, 2, 10);
        // (10 - 2) / 8 = 1; (10 - 6) / 8 = 0.5; (10 - 9) / 8 = 0.125; end and past it: 0.
        assert_eq!(s.lambda(2), 1.0);
        assert_eq!(s.lambda(6), 0.5);
        assert_eq!(s.lambda(9), 0.125);
        assert_eq!(s.lr_at(9), 1e-3 * 0.125);
        assert_eq!(s.lambda(10), 0.0);
        assert_eq!(s.lambda(11), 0.0);
        // No warm-up: the first step has the full rate.
        let s = Schedule::new(ScheduleKind::Linear, 2e-4, 0, 20);
        assert_eq!(s.lr_at(0), 2e-4);
        assert_eq!(s.lr_at(19), 2e-4 * (1.0 / 20.0));
        // Degenerate: total <= warmup uses max(1, .) as the denominator.
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 5, 5);
        assert_eq!(s.lambda(4), 0.8);
        assert_eq!(s.lambda(5), 0.0);
    }

    #[test]
    fn cosine() {
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, 2, 10);
        assert_eq!(s.lambda(2), 1.0);
        // progress 0.5: 0.5 * (1 + cos(pi/2)) = 0.5 + 3.061616997868383e-17 in f64
        assert_eq!(
            s.lambda(6),
            0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * 0.5).cos())
        );
        assert!((s.lambda(6) - 0.5).abs() < 1e-15);
        // progress 0.25: 0.5 * (1 + cos(pi/4)) = 0.8535533905932737
        assert!((s.lambda(4) - 0.853_553_390_593_273_7).abs() < 1e-15);
        // progress 7/8: 0.5 * (1 + cos(7pi/8)) = 0.03806023374435663
        assert!((s.lambda(9) - 0.038_060_233_744_356_63).abs() < 1e-15);
        // End: cos(pi) = -1 -> 0.
        assert_eq!(s.lambda(10), 0.0);
        // Past the end transformers' formula rises again (no clamping of progress).
        assert!(s.lambda(12) > 0.0);
    }
}
