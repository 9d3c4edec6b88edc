//! The model.
pub mod quant_cpu;
