//! Sampling.
pub mod params;
