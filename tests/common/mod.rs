//! Helpers shared by the engine's integration tests.

use candle_core::{DType, Tensor};

/// (max abs difference, max abs of the expected tensor), compared in f32.
pub fn diff(got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape");
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("a tensor convertible to f32")
    };
    let (got, want) = (flat(got), flat(want));
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let m = want.iter().map(|b| b.abs()).fold(0f32, f32::max);
    (d, m)
}
