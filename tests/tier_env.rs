//! `HYDRA_KERNELS` forces a tier and fails loudly when the CPU lacks it.
//! Each case runs this test binary again as a child with the variable set,
//! because the choice is made once per process.

use std::process::Command;

use hydra_edge::kernels::{self, Tier};

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
    let exe = std::env::current_exe().unwrap();
    for tier in Tier::ALL {
        let out = Command::new(&exe)
            .args(["--exact", "forced_tier_is_used_or_refused", "--nocapture", "--test-threads=1"])
            .env("HYDRA_KERNELS", tier.name())
            .env("HYDRA_KERNELS_CHILD", tier.name())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if tier.is_supported() {
            assert!(out.status.success(), "{tier} should run here:\n{log}");
        } else {
            assert!(!out.status.success(), "{tier} must be refused here:\n{log}");
            assert!(log.contains("not available"), "{log}");
        }
    }
    let out = Command::new(&exe)
        .args(["--exact", "forced_tier_is_used_or_refused", "--nocapture"])
        .env("HYDRA_KERNELS", "sse9")
        .env("HYDRA_KERNELS_CHILD", "sse9")
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("unknown kernel tier `sse9`"), "{log}");
}
