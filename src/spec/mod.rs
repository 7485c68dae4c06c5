//! YAML + TOML parsing, validation with FILE:LINE:COL errors, expansion to images.

pub mod types;
pub use types::*;
