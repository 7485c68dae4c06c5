//! Pixel conversion (decoded float image → RGB8) and the safety actions on RGB8 images.

/// Converts an HWC float image in `[0, 1]` to RGB8 as diffusers' `numpy_to_pil` does:
/// `(clamp(x, 0, 1) * 255).round()` in f32 with numpy's round-half-to-even. NaN becomes 0.
pub fn to_rgb8(image: &[f32]) -> Vec<u8> {
    image
        .iter()
        .map(|&x| {
            if x.is_nan() {
                return 0;
            }
            let v = (x.clamp(0.0, 1.0) * 255.0).round_ties_even();
            v.clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// One horizontal box-blur pass over an interleaved RGB buffer, `src` → `dst`. Near the edges the
/// window is cut to the pixels inside the image (no edge pixel is over-weighted).
fn box_pass_h(w: usize, h: usize, r: usize, src: &[u8], dst: &mut [u8]) {
    let mut prefix = vec![0u32; w + 1];
    for y in 0..h {
        let row = y * w * 3;
        for c in 0..3 {
            for x in 0..w {
                prefix[x + 1] = prefix[x] + u32::from(src[row + x * 3 + c]);
            }
            for x in 0..w {
                let lo = x.saturating_sub(r);
                let hi = (x + r).min(w - 1);
                let n = (hi - lo + 1) as u32;
                dst[row + x * 3 + c] = ((prefix[hi + 1] - prefix[lo] + n / 2) / n) as u8;
            }
        }
    }
}

/// Transposes an interleaved RGB image (`w`×`h` → `h`×`w`).
fn transpose(w: usize, h: usize, src: &[u8], dst: &mut [u8]) {
    for y in 0..h {
        for x in 0..w {
            let s = (y * w + x) * 3;
            let d = (x * h + y) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}

/// Blurs an RGB8 image (`w`×`h`, row-major) so strongly that nothing recognisable remains:
/// a separable box blur of radius `max(w, h) / 8`, three times (close to a wide Gaussian).
/// A buffer whose length is not `w * h * 3` is left as it is.
pub fn blur(w: u32, h: u32, rgb: &mut [u8]) {
    let (w, h) = (w as usize, h as usize);
    if w == 0 || h == 0 || rgb.len() != w * h * 3 {
        return;
    }
    let r = (w.max(h) / 8).max(1);
    let mut a = rgb.to_vec();
    let mut b = vec![0u8; a.len()];
    for _ in 0..3 {
        box_pass_h(w, h, r, &a, &mut b);
        transpose(w, h, &b, &mut a);
        box_pass_h(h, w, r, &a, &mut b);
        transpose(h, w, &b, &mut a);
    }
    rgb.copy_from_slice(&a);
}

/// Blacks out an image.
pub fn black(rgb: &mut [u8]) {
    rgb.fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_clamping_nan() {
        // k/255 in f32 times 255 gives exactly k here; numpy rounds these halves to even
        // (values checked with numpy: 0, 2, 2, 126, 128, 254).
        let halves: Vec<f32> = [0.5f32, 1.5, 2.5, 126.5, 128.5, 254.5]
            .iter()
            .map(|k| k / 255.0)
            .collect();
        assert_eq!(to_rgb8(&halves), vec![0, 2, 2, 126, 128, 254]);
        // Just above / below a half step.
        assert_eq!(to_rgb8(&[0.51 / 255.0, 0.49 / 255.0, 0.5]), vec![1, 0, 128]);
        // Clamping, NaN and infinities.
        assert_eq!(
            to_rgb8(&[
                -1.0,
                0.0,
                1.0,
                7.0,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY
            ]),
            vec![0, 0, 255, 255, 0, 255, 0]
        );
    }

    #[test]
    fn blur_flattens_checkerboard_black_zeroes() {
        let (w, h) = (64u32, 48u32);
        let mut rgb = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let v = if (x / 4 + y / 4) % 2 == 0 { 255 } else { 0 };
                rgb.extend_from_slice(&[v, v, v]);
            }
        }
        let orig = rgb.clone();
        blur(w, h, &mut rgb);
        let (min, max) = rgb
            .iter()
            .fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
        // From 0..255 to a narrow band around the mean (edges are clamped, so not exactly flat).
        assert!(max - min <= 48, "blurred range {min}..{max}");
        let n = rgb.len() as f64;
        let mean = rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let sd = (rgb
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!((mean - 127.5).abs() < 10.0, "mean {mean}");
        assert!(sd < 8.0, "std {sd}");
        assert_ne!(rgb, orig);
        black(&mut rgb);
        assert!(rgb.iter().all(|&v| v == 0));
        // Wrong-size buffer: untouched, no panic.
        let mut small = vec![9u8; 5];
        blur(4, 4, &mut small);
        assert_eq!(small, vec![9u8; 5]);
    }
}
