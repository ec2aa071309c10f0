//! Which instruction set the kernels use, detected once at backend creation.
//!
//! `MOE_CPU_ISA` (`avx512bf16`, `avx512`, `avx2`, `portable`) lowers the choice, e.g. to compare
//! paths or to test them all on one machine; asking for a set the CPU lacks is an error.

use moe_core::{MoeError, Result};

/// The kernel family's instruction set, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// AVX-512F with AVX-512 BF16 (`vdpbf16ps`): bf16 weights use dot-product kernels.
    Avx512Bf16,
    /// AVX-512F: all weight dtypes are widened to f32 in registers and FMA'd.
    Avx512,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// Plain Rust (auto-vectorized), for any CPU.
    Portable,
}

impl Isa {
    /// Every set, best first.
    pub const ALL: [Isa; 4] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// Name used by `MOE_CPU_ISA` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run the set.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Bf16 => has!("avx512f") && has!("avx512bf16"),
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The best available set, lowered by `MOE_CPU_ISA` when set.
    pub fn detect() -> Result<Isa> {
        match std::env::var("MOE_CPU_ISA") {
            Ok(v) if !v.is_empty() => Isa::parse(&v),
            _ => Ok(Isa::best()),
        }
    }

    /// The best set this CPU runs.
    pub fn best() -> Isa {
        Isa::ALL.into_iter().find(|i| i.available()).unwrap_or(Isa::Portable)
    }

    /// Parses a name, refusing sets this CPU lacks.
    pub fn parse(s: &str) -> Result<Isa> {
        let isa = Isa::ALL.into_iter().find(|i| i.name() == s).ok_or_else(|| {
            MoeError::config("MOE_CPU_ISA", format!("unknown `{s}`; one of avx512bf16, avx512, avx2, portable"))
        })?;
        if !isa.available() {
            return Err(MoeError::config(
                "MOE_CPU_ISA",
                format!("this CPU lacks {s}; the best it runs is {}", Isa::best().name()),
            ));
        }
        Ok(isa)
    }

    /// Rows per micro-tile: as many as the accumulators fit in the register file.
    pub fn mr(self) -> usize {
        match self {
            Isa::Avx512Bf16 | Isa::Avx512 => 8,
            Isa::Avx2 => 2,
            Isa::Portable => 4,
        }
    }
}
