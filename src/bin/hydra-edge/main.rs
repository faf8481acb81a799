//! The `hydra-edge` command line. For now it says what is built and what is
//! not; the full CLI (inspect, train, eval, merge, run, bench, demo) comes
//! with the issue "The CLI, the default demo, and the real-model study".

fn main() {
    let tier = hydra_edge::kernels::active().tier();
    let cmd = std::env::args().nth(1).unwrap_or_default();
    eprintln!(
        "hydra-edge {}: kernels ({tier} tier) and HydraLinear are built; \
         the ONNX split, trainer, merge/export and CLI subcommands (`{cmd}`) are not yet.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
