//! PNG metadata (A1111 `parameters` + JSON), manifest records, contact sheets, the HTML report.

pub mod record;
pub use record::*;
