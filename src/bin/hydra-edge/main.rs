//! `hydra-edge`: inspect a model, train a Hydra adapter on a device, merge
//! it, run the result; `demo` does all of it on an embedded digits model.

mod commands;
mod demo;
mod plot;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "hydra-edge",
    version,
    about = "On-device adaptation: train Hydra adapters on a frozen ONNX backbone, merge, run"
)]
struct Cli {
    /// Machine-readable JSON output instead of tables and progress bars.
    #[arg(long, global = true)]
    json: bool,
    /// Threads for the whole run: the frozen backbone and the trainable tail
    /// share one pool (0 = one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// Where the trainable tail's dense products run: `cpu`, or `cuda` /
    /// `cuda:N` (a build with `--features cuda` and an NVIDIA GPU).
    #[arg(long, global = true, default_value = "cpu")]
    device: hydra_edge::device::Device,
    /// With a GPU: products of fewer multiply-adds than this stay on the CPU,
    /// where the copies would cost more than the product (0: every product
    /// on the GPU).
    #[arg(long, global = true, default_value_t = hydra_edge::device::GPU_MIN_WORK)]
    gpu_min_work: usize,
    /// Precision of the tail's large dense products: `f32`, or `bf16` (bf16
    /// operands, f32 sums, on bf16 matrix units — Intel AMX — where the CPU
    /// has them, f32 elsewhere; adapters, head and optimizer stay f32).
    #[arg(long, global = true, default_value = "f32")]
    matmul_precision: hydra_edge::runtime::MatmulPrecision,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inputs, outputs, adaptable layers, suggested cuts and whether each is trainable.
    Inspect {
        /// The ONNX model.
        model: PathBuf,
        /// Judge the cuts against this tensor (default: the first ranked output, as `train`).
        #[arg(long)]
        output_tensor: Option<String>,
    },
    /// Train an adapter (and optionally a new head) on an .npz dataset.
    Train(Box<TrainArgs>),
    /// Loss and accuracy of a trained adapter on an .npz dataset.
    Eval {
        /// The ONNX model the adapter was trained on.
        model: PathBuf,
        /// The .hydra adapter file.
        adapter: PathBuf,
        /// Evaluation data (.npz).
        #[arg(long)]
        data: PathBuf,
        /// Name of the label array in the .npz.
        #[arg(long, default_value = "label")]
        label_key: String,
    },
    /// Merge an adapter into the model and write a plain ONNX file.
    Merge {
        /// The ONNX model.
        model: PathBuf,
        /// The .hydra adapter file.
        adapter: PathBuf,
        /// Output path of the merged model.
        #[arg(short, long)]
        output: PathBuf,
        /// Append a Softmax after a new head.
        #[arg(long)]
        softmax: bool,
        /// Data to check merged against unmerged on (default: the first 16
        /// samples of the adapter's recorded training data, else synthetic inputs).
        #[arg(long)]
        check_data: Option<PathBuf>,
    },
    /// Run a model on inputs from an .npz file.
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// Inputs (.npz, arrays named like the model's inputs).
        #[arg(long)]
        input: PathBuf,
        /// Write the outputs to this .npz.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Samples per run of the model (the outputs are concatenated).
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Kernel and train-step figures on this machine.
    Bench,
    /// The whole job on an embedded digits model: adapt to a new user, merge, compare.
    Demo {
        /// Training epochs.
        #[arg(long, default_value_t = 30)]
        epochs: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    Hydra,
    Lora,
    Seqlora,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Cosine,
    Constant,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerArg {
    Adamw,
    Sgd,
}

#[derive(Args)]
struct TrainArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Training data (.npz: model inputs by name + a label array).
    #[arg(long)]
    data: PathBuf,
    /// Held-out evaluation data (.npz); default: none.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Name of the label array (integers: classes; floats: targets).
    #[arg(long, default_value = "label")]
    label_key: String,
    /// Layers to adapt: `all`, `last:K` (blocks), `none` (head only), or comma-separated name patterns.
    #[arg(long, default_value = "all")]
    targets: String,
    /// Adapter variant.
    #[arg(long, value_enum, default_value = "hydra")]
    variant: VariantArg,
    /// Rank of each branch (`--rank 4`, or `--rank 4,8` for parallel,sequential).
    #[arg(long, default_value = "4,8")]
    rank: String,
    /// Scale of each branch (one value, or parallel,sequential).
    #[arg(long, default_value = "1.0")]
    scale: String,
    /// `keep` the model's output, or `new:N` for a new N-way head on the tail's output.
    #[arg(long, default_value = "keep")]
    head: String,
    /// The tensor the tail ends at (default: the first of the model's outputs as `inspect`
    /// ranks them: declared `[B, H]`/`[B, C]` outputs first).
    #[arg(long)]
    output_tensor: Option<String>,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Learning-rate schedule after warmup: `cosine` (decays to --min-lr at the last step) or `constant`.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: ScheduleArg,
    /// Floor of the cosine decay.
    #[arg(long, default_value_t = 0.0)]
    min_lr: f32,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f32,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    /// Dropout on the adapters' inputs (both branches).
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Refuse to start above this estimated peak memory (MB).
    #[arg(long)]
    budget_mb: Option<f64>,
    /// Where to write the adapter.
    #[arg(long, default_value = "adapter.hydra")]
    out: PathBuf,
    /// Resume from this checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write a checkpoint here after every epoch.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Write an SVG learning curve here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Disable the feature cache.
    #[arg(long)]
    no_cache: bool,
    /// With a GPU: keep a feature cache of at most this many MB on the GPU
    /// (and at most half its free memory), so that each batch's features
    /// are gathered there instead of sent up (0: never). On a Jetson this
    /// memory is the board's RAM.
    #[arg(long, default_value_t = 256)]
    gpu_cache_mb: usize,
    /// Write the last epoch's adapter, not the best one (lowest eval loss
    /// with --eval, else lowest train loss).
    #[arg(long)]
    keep_last: bool,
    /// Replace an existing --out even when it scores better on this run's data.
    #[arg(long)]
    overwrite: bool,
    /// Stop when an epoch's loss exceeds this many times its start (0: never).
    #[arg(long, default_value_t = 10.0)]
    divergence_factor: f64,
}

fn main() {
    let cli = Cli::parse();
    // A bad HYDRA_KERNELS is a configuration error, reported before anything runs.
    if let Err(e) = hydra_edge::kernels::select() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    hydra_edge::runtime::keep_freed_memory(256 << 20);
    if let Err(e) = hydra_edge::parallel::set_threads(cli.threads) {
        eprintln!("error: --threads: {e}");
        std::process::exit(1);
    }
    let json = cli.json;
    let cpu_bf16 = hydra_edge::runtime::set_matmul_precision(cli.matmul_precision);
    hydra_edge::device::set_gpu_min_work(cli.gpu_min_work);
    if cli.device != hydra_edge::device::Device::Cpu {
        match hydra_edge::device::set_device(cli.device) {
            Ok(info) if !json => eprintln!(
                "device: {} ({}{})",
                info.device,
                info.name,
                info.memory_bytes.map_or(String::new(), |b| format!(
                    ", {:.1} GiB",
                    b as f64 / (1u64 << 30) as f64
                ))
            ),
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: --device: {e}");
                std::process::exit(1);
            }
        }
    }
    let bf16 = cli.matmul_precision == hydra_edge::runtime::MatmulPrecision::Bf16;
    let on_gpu = cli.device != hydra_edge::device::Device::Cpu;
    if bf16 && cpu_bf16 && on_gpu && !hydra_edge::device::gpu_bf16() {
        eprintln!(
            "note: --matmul-precision bf16: the GPU has no bf16 tensor cores (compute capability < 8.0); its products stay f32, those left to this CPU run in bf16"
        );
    }
    if bf16 && !cpu_bf16 {
        if hydra_edge::device::gpu_bf16() {
            eprintln!(
                "note: --matmul-precision bf16: the GPU's products take bf16 operands; those left to this CPU (no AMX-BF16) stay f32"
            );
        } else {
            eprintln!(
                "note: --matmul-precision bf16: this CPU (or OS) has no bf16 matrix units (AMX-BF16){}; the products stay f32",
                if cli.device == hydra_edge::device::Device::Cpu {
                    ""
                } else {
                    " and the GPU has no bf16 tensor cores"
                }
            );
        }
    }
    let r = match cli.cmd {
        Cmd::Inspect { model, output_tensor } => {
            commands::inspect(&model, output_tensor.as_deref(), json)
        }
        Cmd::Train(a) => commands::train(&a, json),
        Cmd::Eval { model, adapter, data, label_key } => {
            commands::eval(&model, &adapter, &data, &label_key, json)
        }
        Cmd::Merge { model, adapter, output, softmax, check_data } => {
            commands::merge(&model, &adapter, &output, softmax, check_data.as_deref(), json)
        }
        Cmd::Run { model, input, output, batch } => {
            commands::run(&model, &input, output.as_deref(), batch, json)
        }
        Cmd::Bench => demo::bench(json),
        Cmd::Demo { epochs } => demo::demo(epochs, json),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
