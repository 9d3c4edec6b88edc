//! Chat template (placeholder being written).
