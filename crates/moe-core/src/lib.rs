//! Core of the MoE layer runtime: the problem (config), its exact semantics (routing,
//! activations, quant formats, permutation), the contracts backends and communication strategies
//! implement, the scheduler, EPLB hooks, the assembler and the factory. No device types appear in
//! this crate's API; device crates plug in through [`backend::BackendProvider`] and
//! [`tensor::DeviceStorage`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod compare;
pub mod config;
pub mod eplb;
pub mod error;
pub mod factory;
pub mod moe;
pub mod permute;
pub mod quant;
pub mod routing;
pub mod scheduler;
pub mod tensor;
pub mod weights;

pub use backend::{BackendInput, BackendProvider, ExpertBackend, Hardware, LocalWeights, SchedulerKind, SlotRange};
pub use config::{
    Activation, GroupMaskValue, MoeConfig, ParallelConfig, RoutingConfig, SharedExpertConfig, V2TopkMethod,
};
pub use error::{MoeError, Result};
pub use factory::{BackendRegistry, Selection};
pub use moe::{BuildOptions, ConfigurableMoe};
pub use quant::QuantFormat;
pub use routing::{Logical, Physical, TopK};
pub use tensor::{DType, Tensor};
pub use weights::{random_hidden, MoeWeights};
