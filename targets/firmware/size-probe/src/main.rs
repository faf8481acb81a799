//! Firmware size probe: a bare-metal image whose entry calls every kernel of
//! the active tier and a HydraLinear train-and-merge step, with opaque inputs
//! (`black_box`) so nothing is folded away. Its `.text` is what linking the
//! `no_std` core costs a firmware (see targets/README.md for the number).
//!
//! It is never run: it has no vector table or start-up code, only what the
//! linker needs to keep the core.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use core::alloc::{GlobalAlloc, Layout};
use core::hint::black_box;
use core::sync::atomic::{AtomicUsize, Ordering};

use hydra_edge::hydra::{Input, Weights};
use hydra_edge::{HydraConfig, HydraLinear, f16, kernels};

/// A bump allocator over a static arena: the smallest allocator `alloc` can
/// use, so the measurement is the core's, not an allocator's.
struct Bump;

const ARENA: usize = 64 * 1024;
static mut HEAP: [u8; ARENA] = [0; ARENA];
static NEXT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: hands out disjoint, aligned ranges of HEAP and never reuses them.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = core::ptr::addr_of_mut!(HEAP) as usize;
        let mut cur = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let end = start + layout.size();
            if end > ARENA {
                return core::ptr::null_mut();
            }
            match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => cur = now,
            }
        }
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Every kernel once, on small opaque buffers.
fn kernels_once() {
    let k = kernels::active();
    let (n, d, r) = (black_box(4), black_box(16), black_box(2));
    let x = black_box(vec![0.5f32; n * d]);
    let xh = black_box(vec![f16::from_f32(0.5); n * d]);
    let a = black_box(vec![0.25f32; r * d]);
    let b = black_box(vec![0.25f32; d * r]);
    let mut u = vec![0.0f32; n * r];
    let mut y = vec![0.0f32; n * d];
    let mut dx = vec![0.0f32; n * d];
    let mut da = vec![0.0f32; r * d];
    let mut db = vec![0.0f32; d * r];
    let mut w = vec![0.0f32; d * d];
    let mut wh = vec![f16::ZERO; d * d];
    let mut h = vec![f16::ZERO; n * d];
    let mut back = vec![0.0f32; n * d];
    k.down_f32(&x, &a, &mut u, n, d, r);
    k.down_f16(&xh, &a, &mut u, n, d, r);
    k.up(&u, &b, &mut y, 0.5, n, d, r);
    k.grad_u(&y, &b, &mut u, n, d, r);
    k.grad_x(&u, &a, &mut dx, 0.5, n, d, r);
    k.grad_a_f32(&u, &x, &mut da, 0.5, n, d, r);
    k.grad_a_f16(&u, &xh, &mut da, 0.5, n, d, r);
    k.grad_b(&y, &u, &mut db, 0.5, n, d, r);
    k.merge_f32(&b, &a, &mut w, 0.5, d, d, r);
    k.merge_f16(&b, &a, &mut wh, 0.5, d, d, r);
    k.f32_to_f16(&dx, &mut h);
    k.f16_to_f32(&h, &mut back);
    black_box((u, y, dx, da, db, w, wh, back));
}

/// One Hydra training step on an f16 layer, then the merge.
fn hydra_once() -> Option<()> {
    let (n, d) = (black_box(4), black_box(16));
    let w0 = Weights::F16(black_box(vec![f16::from_f32(0.1); d * d]));
    let mut layer = HydraLinear::new(HydraConfig::default(), w0, None, d, d).ok()?;
    layer.set_training(true);
    let x = black_box(vec![f16::from_f32(0.5); n * d]);
    let y = layer.forward(Input::F16(&x), n).ok()?;
    let dx = layer.backward(&y).ok()?;
    layer.merge().ok()?;
    black_box((dx, layer.weights().len()));
    Some(())
}

/// The image's entry point.
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    kernels_once();
    black_box(hydra_once());
    loop {}
}
