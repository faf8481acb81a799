//! On-device training: data, losses, optimisers, a new head, the feature
//! cache, the trainer, and checkpoints (adapter files with optimiser state).

pub mod cache;
pub mod checkpoint;
pub mod data;
pub mod head;
pub mod loss;
pub mod npz;
pub mod optim;
pub mod trainer;

pub use cache::{CacheConfig, CacheDtype, FeatureCache};
pub use data::{Dataset, Labels};
pub use head::{HeadConfig, LinearHead};
pub use loss::Loss;
pub use optim::{OptimizerKind, Schedule};
pub use trainer::{EpochMetrics, Event, MemoryReport, TrainConfig, Trainer};
