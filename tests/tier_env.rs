//! `HYDRA_KERNELS` forces a tier and fails loudly when the CPU lacks it.
//! Each case runs this test binary again as a child with the variable set,
//! because the choice is made once per process.
//!
//! Under qemu-user (the aarch64 tiers in CI) the kernel can exec a foreign
//! binary only where binfmt_misc is registered, which containers often lack;
//! there the children go through the runner cargo used, named by
//! `HYDRA_TEST_RUNNER` or found as `CARGO_TARGET_<this arch>…_RUNNER`.

mod common;

use std::io::Write;
use std::process::{Command, Output};

use common::rerun_self;
use hydra_edge::kernels::{self, Tier};

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot start {cmd:?}: {e}. Under an emulator without binfmt_misc, set \
             HYDRA_TEST_RUNNER to the runner (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`)"
        )
    });
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, log)
}

#[test]
fn forced_tier_is_used_or_refused() {
    if let Ok(want) = std::env::var("HYDRA_KERNELS_CHILD") {
        // Child: report what dispatch did.
        match kernels::select() {
            Ok(t) => {
                assert_eq!(t.name(), want);
                assert_eq!(kernels::active().tier(), t);
            }
            Err(e) => panic!("refused: {e}"),
        }
        return;
    }
    let args = ["--exact", "forced_tier_is_used_or_refused", "--nocapture", "--test-threads=1"];
    let mut forced = Vec::new();
    for tier in Tier::ALL {
        let (out, log) = run(rerun_self(&args)
            .env("HYDRA_KERNELS", tier.name())
            .env("HYDRA_KERNELS_CHILD", tier.name()));
        if tier.is_supported() {
            assert!(out.status.success(), "{tier} should run here:\n{log}");
            forced.push(tier.name());
        } else {
            assert!(!out.status.success(), "{tier} must be refused here:\n{log}");
            assert!(log.contains("not available"), "{log}");
        }
    }
    let (out, log) =
        run(rerun_self(&args[..3]).env("HYDRA_KERNELS", "sse9").env("HYDRA_KERNELS_CHILD", "sse9"));
    assert!(!out.status.success());
    assert!(log.contains("unknown kernel tier `sse9`"), "{log}");
    for tier in Tier::ALL {
        assert!(log.contains(tier.name()), "the error should list `{tier}`:\n{log}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "HYDRA_KERNELS forced and used: {}; every other tier refused",
        forced.join(", ")
    );
}

/// CI sets `HYDRA_EXPECT_TIER` per machine (e.g. `neon` under
/// `QEMU_CPU=cortex-a72`, `fp16` under `cortex-a76`) so that a detection
/// bug which silently picks a narrower tier fails the run.
#[test]
fn dispatch_picks_the_tier_the_environment_expects() {
    let tier = kernels::select().unwrap();
    assert_eq!(kernels::active().tier(), tier);
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    // Written to the real stderr (not libtest's capture) so the CI log shows it.
    let _ = writeln!(
        std::io::stderr(),
        "dispatched kernel tier: {tier} (arch {}, QEMU_CPU={}, HYDRA_KERNELS={}, available: {})",
        std::env::consts::ARCH,
        env("QEMU_CPU"),
        env("HYDRA_KERNELS"),
        Tier::available().map(Tier::name).collect::<Vec<_>>().join(", "),
    );
    if let Ok(want) = std::env::var("HYDRA_EXPECT_TIER") {
        assert_eq!(tier, Tier::parse(&want).unwrap(), "HYDRA_EXPECT_TIER={want}");
    }
}
