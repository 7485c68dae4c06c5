//! sd-run: declarative YAML campaigns of Stable Diffusion images, on candle.
//!
//! spec → plan → cache → engine → run → output; `serve` puts the same behind HTTP.

pub mod cache;
pub mod engine;
pub mod output;
pub mod plan;
pub mod run;
pub mod serve;
pub mod spec;
