//! PNG metadata (A1111 `parameters` + JSON), manifest records, contact sheets, the HTML report.

pub mod contact_sheet;
mod font;
pub mod pixels;
pub mod png_meta;
pub mod record;
pub mod report;

pub use contact_sheet::{
    contact_sheet, encode_plain_png, job_sheet, Axis, CellContent, Sheet, SheetCell,
};
pub use pixels::{black, blur, to_rgb8};
pub use png_meta::{
    a1111_parameters, encode_png, encode_png_with, parse_parameters, read_record, read_text_chunks,
    A1111Params,
};
pub use record::*;
pub use report::report_html;

/// Errors of the output stage.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The pixel buffer does not hold `width * height * 3` bytes.
    #[error("image buffer holds {got} bytes, {width}x{height} RGB needs {want}")]
    BufferSize {
        width: u32,
        height: u32,
        got: usize,
        want: usize,
    },
    /// Width or height is zero.
    #[error("image size {width}x{height} is empty")]
    EmptyImage { width: u32, height: u32 },
    /// The PNG encoder failed.
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] png::EncodingError),
    /// The bytes are not a readable PNG.
    #[error("PNG decoding failed: {0}")]
    Decode(#[from] png::DecodingError),
    /// A text chunk could not be decoded.
    #[error("PNG text chunk `{keyword}` is unreadable: {reason}")]
    TextChunk { keyword: String, reason: String },
    /// The manifest record could not be serialised.
    #[error("manifest record to JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An image file could not be read or decoded.
    #[error("image: {0}")]
    Image(String),
    /// An A1111 `parameters` text could not be parsed.
    #[error("A1111 parameters: {0}")]
    Parameters(String),
}
