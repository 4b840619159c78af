//! Named recipes: `switch train --preset NAME` applies a preset's settings on top of the
//! defaults (or of a `--config` file), before any `--set`. A preset changes neither the tokens
//! per step nor the FLOPs per token of the model it is applied to; `BENCHMARKS.md` holds the
//! measurements each one was chosen from.

use anyhow::{Result, bail};

use super::RunConfig;

/// A named set of `key=value` settings.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// What `--preset` takes.
    pub name: &'static str,
    /// One line on what it is and what it gave.
    pub about: &'static str,
    /// The settings, in the order they are applied.
    pub sets: &'static [&'static str],
}

/// Every preset.
pub const PRESETS: &[Preset] = &[Preset {
    name: "tuned",
    about: "labml's model and data at the same FLOPs per token and tokens per step, trained \
            better: learned positions, independently drawn experts and layers, a 500-step \
            warm-up (BENCHMARKS.md: 'A recipe that beats labml's curve')",
    sets: &[
        "model.pos_embedding=true",
        "model.init=independent",
        "train.warmup=500",
    ],
}];

impl RunConfig {
    /// Applies the preset `name`'s settings; an unknown name is an error that lists the
    /// presets.
    pub fn apply_preset(&mut self, name: &str) -> Result<()> {
        let Some(p) = PRESETS.iter().find(|p| p.name == name) else {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            bail!(
                "unknown preset `{name}`; the presets are: {}",
                names.join(", ")
            );
        };
        for s in p.sets {
            self.set(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_apply_their_settings_and_keep_the_compute() {
        for p in PRESETS {
            let mut c = RunConfig::default();
            c.apply_preset(p.name).unwrap();
            c.validate().unwrap();
            let base = RunConfig::default();
            assert_eq!(
                c.model.flops_per_token(c.train.seq_len),
                base.model.flops_per_token(base.train.seq_len),
                "{}",
                p.name
            );
            assert_eq!(
                (c.train.batch_size, c.train.seq_len),
                (base.train.batch_size, base.train.seq_len)
            );
            assert_ne!(c, base);
        }
        let err = RunConfig::default().apply_preset("fastest").unwrap_err();
        assert!(err.to_string().contains("the presets are: tuned"), "{err}");
    }
}
