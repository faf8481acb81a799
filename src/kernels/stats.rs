//! Counters that show which path a real run took: how often the f16 kernels
//! ran (cached f16 activations reaching them directly) and how many f16
//! elements had to be widened to f32 on the way, and how many dense products
//! ran with bf16 operands. Relaxed atomics: a count,
//! not a synchronisation point.

use core::sync::atomic::{AtomicUsize, Ordering};

static F16_KERNEL_CALLS: AtomicUsize = AtomicUsize::new(0);
static WIDENED: AtomicUsize = AtomicUsize::new(0);
static BF16_PRODUCTS: AtomicUsize = AtomicUsize::new(0);

/// Dense products run with bf16 operands (AMX) so far.
pub fn bf16_products() -> usize {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn count_bf16_product() {
    BF16_PRODUCTS.fetch_add(1, Ordering::Relaxed);
}

/// Calls of the f16-activation kernels (`down_f16`, `grad_a_f16`) so far.
pub fn f16_kernel_calls() -> usize {
    F16_KERNEL_CALLS.load(Ordering::Relaxed)
}

/// f16 activation elements widened to f32 on their way into an op so far.
pub fn widened_elements() -> usize {
    WIDENED.load(Ordering::Relaxed)
}

pub(crate) fn count_f16_call() {
    F16_KERNEL_CALLS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_widened(n: usize) {
    WIDENED.fetch_add(n, Ordering::Relaxed);
}
