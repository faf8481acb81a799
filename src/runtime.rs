//! Process-wide knobs an app sets once at start-up, beside
//! [`crate::parallel::set_threads`].
//!
//! A training step allocates and frees activations of a few MB each. glibc
//! serves such blocks with fresh `mmap`s and hands them back on free, so every
//! step pays page faults and zeroing for memory it just released: about a
//! fifth of a MiniLM step on this project's machines (`hydra-edge train`,
//! 3.4 s → 2.7 s per epoch, same peak RSS). [`keep_freed_memory`] raises
//! glibc's mmap and trim thresholds so freed blocks are reused instead.
//!
//! [`set_matmul_precision`] lets the tail's large dense products use bf16
//! matrix units (AMX-BF16) where the CPU has them, as PyTorch's
//! `torch.set_float32_matmul_precision("medium")` does.

use core::sync::atomic::{AtomicBool, Ordering};

/// Precision of the tail's large dense products: the frozen layers'
/// (forward and backward) and attention's, those with at least 16 rows, 16
/// columns and 32 terms. The adapters' low-rank products, heads, norms,
/// losses and the optimizer always stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 operands and accumulation (the default).
    #[default]
    F32,
    /// Operands rounded to bf16 (8 significant bits), sums in f32, where the
    /// CPU has bf16 matrix units (Intel AMX-BF16: Xeon Sapphire Rapids and
    /// later); f32 elsewhere. Each product's relative error grows to ~2⁻⁸
    /// (~0.4 %) of its terms' magnitude.
    Bf16,
}

impl core::str::FromStr for MatmulPrecision {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            _ => Err(crate::Error::Config(format!(
                "matmul precision `{s}`: expected `f32` or `bf16`"
            ))),
        }
    }
}

static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);
/// What was asked for, whether or not the CPU can: a GPU in use
/// (`crate::device`) with bf16 tensor cores follows the request.
static BF16_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Sets the precision of the tail's large dense products for the whole
/// process (like [`crate::parallel::set_threads`]). Returns whether bf16
/// products will run: false for [`MatmulPrecision::F32`], and for
/// [`MatmulPrecision::Bf16`] on a CPU (or OS) without bf16 matrix units,
/// where the products stay f32. A GPU in use (`--device cuda`, with the
/// `cuda` feature) follows the request on its own: its products take bf16
/// operands where it has bf16 tensor cores (compute capability 8.0 and later:
/// A100, H100, Jetson Orin), whatever the CPU has
/// (`crate::device::gpu_bf16`).
pub fn set_matmul_precision(p: MatmulPrecision) -> bool {
    let on = p == MatmulPrecision::Bf16 && bf16_units();
    BF16_REQUESTED.store(p == MatmulPrecision::Bf16, Ordering::Relaxed);
    BF16_PRODUCTS.store(on, Ordering::Relaxed);
    on
}

/// Whether bf16 products were asked for ([`set_matmul_precision`]), whether
/// or not this CPU runs them.
pub fn bf16_requested() -> bool {
    BF16_REQUESTED.load(Ordering::Relaxed)
}

/// Whether large dense products currently run in bf16.
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

/// Runs `f` with f32 products, then restores the precision: for checks whose
/// reference must be exact, such as the merge check (merged vs unmerged model
/// agree to f32 rounding; bf16 products would move the unmerged side by
/// ~1e-2). Process-wide like the knob: meant for a point where no other
/// thread is training.
pub fn with_f32_products<T>(f: impl FnOnce() -> T) -> T {
    /// Restores the precision also when `f` panics.
    struct Restore(bool, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BF16_PRODUCTS.store(self.0, Ordering::Relaxed);
            BF16_REQUESTED.store(self.1, Ordering::Relaxed);
        }
    }
    let _restore = Restore(
        BF16_PRODUCTS.swap(false, Ordering::Relaxed),
        BF16_REQUESTED.swap(false, Ordering::Relaxed),
    );
    f()
}

/// Whether this CPU and OS can run bf16 products (AMX-BF16, tile state
/// granted by the kernel).
pub fn bf16_units() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::amx_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Keeps freed heap memory in the process for reuse (glibc: serves blocks up
/// to `max_block` bytes from the heap and trims it only beyond twice that).
/// Returns whether the allocator accepted it (always false off glibc).
pub fn keep_freed_memory(max_block: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let v = i32::try_from(max_block).unwrap_or(i32::MAX);
        let t = i32::try_from(max_block.saturating_mul(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes allocator parameters; any value is valid input.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, v) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, t) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = max_block;
        false
    }
}

/// Returns freed heap memory to the system now (glibc `malloc_trim`): after
/// loading a model, whose file copy is no longer needed once the backbone
/// plan and the tail are built. Returns whether anything was released.
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free heap pages to the system.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
