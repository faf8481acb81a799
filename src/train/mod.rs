//! On-device training on an [`AdaptedModel`](crate::model::AdaptedModel):
//! data, losses, optimisers, the trainer, and checkpoints (adapter files with
//! optimiser state).

pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod npz;
pub mod optim;
pub mod trainer;

pub use data::{Dataset, Labels};
pub use loss::Loss;
pub use optim::{OptimizerKind, Schedule};
pub use trainer::{EpochMetrics, Event, MemoryReport, TrainConfig, Trainer};
