//! Which vector instructions the CPU kernels use, chosen once at run time: AVX-512 (16 f32
//! lanes), AVX2 with FMA (8 lanes), or portable code.
//!
//! `SWITCH_SIMD=avx512|avx2|portable` caps the choice, so that one machine can run and time
//! every path (a level the CPU lacks is refused: [`check_env`] says so before any work).

use std::sync::OnceLock;

use anyhow::{Result, bail};

/// An instruction-set level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust loops (whatever the compiler makes of them for the build's target).
    Portable,
    /// AVX2 and FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 F: 16 f32 lanes.
    Avx512,
}

impl Isa {
    /// The names `SWITCH_SIMD` takes.
    pub(crate) const NAMES: [(&'static str, Isa); 3] = [
        ("portable", Isa::Portable),
        ("avx2", Isa::Avx2),
        ("avx512", Isa::Avx512),
    ];

    /// The highest level this CPU has.
    pub(crate) fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every level this CPU can run, lowest first (what a test compares).
    pub fn available() -> Vec<Isa> {
        let top = Isa::detected();
        Isa::NAMES
            .iter()
            .map(|&(_, i)| i)
            .filter(|&i| i <= top)
            .collect()
    }

    /// The level the kernels use: `Isa::detected`, capped by `SWITCH_SIMD` when it is set
    /// to a level this CPU has.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| match from_env() {
            Ok(Some(isa)) => isa,
            _ => Isa::detected(),
        })
    }

    /// The name `SWITCH_SIMD` gives this level.
    pub fn name(self) -> &'static str {
        Isa::NAMES.iter().find(|(_, i)| *i == self).unwrap().0
    }
}

fn from_env() -> Result<Option<Isa>> {
    let Ok(value) = std::env::var("SWITCH_SIMD") else {
        return Ok(None);
    };
    let Some(&(_, isa)) = Isa::NAMES.iter().find(|(n, _)| *n == value.trim()) else {
        bail!("SWITCH_SIMD={value:?} is not one of portable, avx2, avx512 (or leave it unset)");
    };
    if isa > Isa::detected() {
        bail!(
            "SWITCH_SIMD={value} asks for {} but this CPU has only {}: unset it or name a lower level",
            isa.name(),
            Isa::detected().name()
        );
    }
    Ok(Some(isa))
}

/// An error when `SWITCH_SIMD` is set to a value the kernels cannot honour (the binary calls
/// this first, so that a typo does not silently time the wrong path).
pub fn check_env() -> Result<()> {
    from_env().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_named() {
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        for (name, isa) in Isa::NAMES {
            assert_eq!(isa.name(), name);
        }
        let available = Isa::available();
        assert_eq!(available[0], Isa::Portable);
        assert_eq!(*available.last().unwrap(), Isa::detected());
        assert!(Isa::selected() <= Isa::detected());
    }
}
