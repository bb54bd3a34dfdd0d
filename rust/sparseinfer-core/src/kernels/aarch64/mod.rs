//! aarch64 SIMD kernels: NEON (Advanced SIMD), which every aarch64 CPU has, enabled per function with
//! `#[target_feature]` and still detected at run time like the x86 paths.

pub(crate) mod attention;
pub(crate) mod neon;
pub(crate) mod neon_int;

/// NEON path requirements.
pub fn neon_supported() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

/// The kernel-relevant features this CPU reports.
pub fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => {$(
            if std::arch::is_aarch64_feature_detected!($name) {
                f.push($name);
            }
        )*};
    }
    probe!("neon", "dotprod", "i8mm", "bf16", "sve", "sve2");
    f
}
