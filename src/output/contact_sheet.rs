//! Contact sheets: a job's images in a labelled grid, like AUTOMATIC1111's X/Y plot.
//!
//! Each cell carries its coordinates (the image's `(field, value)` pairs); an [`Axis`] maps a
//! coordinate to a column (X) or row (Y). An axis may combine several fields (the cartesian
//! product of their values): that is how a grid of more than two axes fits one sheet: the first
//! axis goes along X and every other one (then `prompt`, then `seed`) is folded into the Y
//! labels (see [`sheet_axes`]).

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Rgb};

use super::font::{descends, glyph, GLYPH_H, GLYPH_W};
use super::png_meta::encode_rgb_png;
use super::{ImageStatus, ManifestRecord, OutputError};
use crate::spec::{GridAxis, Job};
use std::path::Path;

/// Font pixels → sheet pixels.
const SCALE: usize = 2;
/// Horizontal advance and line height of the scaled font.
const ADVANCE: usize = (GLYPH_W + 1) * SCALE;
const LINE_H: usize = (GLYPH_H + 2) * SCALE;
/// Margin around the sheet and between label bands and the grid.
const PAD: usize = 8;
/// Gap between cells.
const GAP: usize = 4;
/// Thumbnail height bounds: small images are upscaled (nearest), large ones downscaled.
const MIN_CELL_H: u32 = 128;
const MAX_CELL_H: u32 = 256;
/// Sheets with more cells than this use the minimum cell height.
const MANY_CELLS: usize = 36;
/// Longest Y label line, in characters.
const MAX_Y_LABEL_CHARS: usize = 24;
/// Most lines of an X label.
const MAX_X_LABEL_LINES: usize = 3;

const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];
const MISSING_TILE: [u8; 3] = [150, 150, 150];
const EMPTY_TILE: [u8; 3] = [225, 225, 225];

/// One axis of a sheet: one or more fields and, for each position, one value per field.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub fields: Vec<String>,
    pub values: Vec<Vec<String>>,
}

impl Axis {
    /// A one-field axis.
    pub fn new(field: impl Into<String>, values: Vec<String>) -> Self {
        Self {
            fields: vec![field.into()],
            values: values.into_iter().map(|v| vec![v]).collect(),
        }
    }

    /// The axis of a job's `grid:` entry.
    pub fn from_grid(axis: &GridAxis) -> Self {
        Self::new(axis.field.clone(), axis.values.clone())
    }

    /// The cartesian product of several axes (the first varies slowest); `None` when empty.
    pub fn product(axes: &[Axis]) -> Option<Self> {
        let (first, rest) = axes.split_first()?;
        let mut out = first.clone();
        for axis in rest {
            let mut values = Vec::with_capacity(out.values.len() * axis.values.len());
            for a in &out.values {
                for b in &axis.values {
                    values.push(a.iter().chain(b.iter()).cloned().collect());
                }
            }
            out.fields.extend(axis.fields.iter().cloned());
            out.values = values;
        }
        Some(out)
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the axis has no positions.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The label of position `i`: `field: value, field: value`.
    pub fn label(&self, i: usize) -> String {
        self.label_parts(i).join(", ")
    }

    /// The `field: value` parts of position `i`'s label.
    pub fn label_parts(&self, i: usize) -> Vec<String> {
        let Some(vals) = self.values.get(i) else {
            return Vec::new();
        };
        self.fields
            .iter()
            .zip(vals)
            .map(|(f, v)| format!("{f}: {v}"))
            .collect()
    }

    /// The position of a point (its `(field, value)` pairs) on this axis.
    pub fn index_of(&self, point: &[(String, String)]) -> Option<usize> {
        let mine: Option<Vec<&str>> = self
            .fields
            .iter()
            .map(|f| point.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str()))
            .collect();
        let mine = mine?;
        self.values
            .iter()
            .position(|vals| vals.iter().map(String::as_str).eq(mine.iter().copied()))
    }
}

/// What a cell shows.
#[derive(Debug, Clone, PartialEq)]
pub enum CellContent {
    /// An RGB8 image, row-major.
    Image {
        width: u32,
        height: u32,
        rgb: Vec<u8>,
    },
    /// No image: a grey tile with this word (`dropped`, `failed`, `quarantined`).
    Missing(String),
}

/// One image of a sheet and its coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetCell {
    pub point: Vec<(String, String)>,
    pub content: CellContent,
}

/// A rendered sheet and its layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Sheet {
    pub width: u32,
    pub height: u32,
    /// RGB8, row-major.
    pub rgb: Vec<u8>,
    /// Size of every cell.
    pub cell_width: u32,
    pub cell_height: u32,
    /// Top-left corner of the first cell.
    pub grid_x: u32,
    pub grid_y: u32,
    pub columns: u32,
    pub rows: u32,
    /// Pixels between cells.
    pub gap: u32,
    /// Height of the title band (from the top edge) and of the X label band under it.
    pub title_height: u32,
    pub x_label_height: u32,
    /// Width of the Y label band (left of the grid, after the margin).
    pub y_label_width: u32,
}

/// The coordinates of a record as [`sheet_axes`] names them: its grid point, `prompt`, `seed`.
pub fn record_point(record: &ManifestRecord) -> Vec<(String, String)> {
    let mut p = record.grid.clone();
    p.push(("prompt".into(), record.prompt.clone()));
    p.push(("seed".into(), record.seed.to_string()));
    p
}

/// The axes of a job's sheet. Dimensions are the grid axes, then `prompt` (when the job has
/// more than one) and `seed` (when more than one). X is the first grid axis (or `seed` when
/// there is no grid); Y is the product of all the others, so every image gets its own cell.
pub fn sheet_axes(
    grid: &[GridAxis],
    prompts: &[String],
    seeds: &[u64],
) -> (Option<Axis>, Option<Axis>) {
    let mut dims: Vec<Axis> = grid.iter().map(Axis::from_grid).collect();
    let seed_axis =
        (seeds.len() > 1).then(|| Axis::new("seed", seeds.iter().map(u64::to_string).collect()));
    let prompt_axis = (prompts.len() > 1).then(|| Axis::new("prompt", prompts.to_vec()));
    if dims.is_empty() {
        // No grid: seeds across, prompts down.
        return (seed_axis, prompt_axis);
    }
    dims.extend(prompt_axis);
    dims.extend(seed_axis);
    let x = dims.remove(0);
    (Some(x), Axis::product(&dims))
}

/// Decodes a PNG to RGB8 `(width, height, pixels)`.
pub fn decode_rgb8(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), OutputError> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| OutputError::Image(e.to_string()))?
        .to_rgb8();
    Ok((img.width(), img.height(), img.into_raw()))
}

/// The sheet cell of a record: its PNG (read from `root` joined with its `path`), or a grey tile
/// saying why there is none: `failed`, `dropped`, `quarantined` (never shown) or `unreadable`.
pub fn record_cell(record: &ManifestRecord, root: &Path) -> SheetCell {
    let point = record_point(record);
    let missing = |w: &str| SheetCell {
        point: point.clone(),
        content: CellContent::Missing(w.into()),
    };
    if record.status == ImageStatus::Failed {
        return missing("failed");
    }
    match record.safety.action.as_deref() {
        Some("quarantine") if record.safety.flagged => return missing("quarantined"),
        Some("drop") if record.safety.flagged => return missing("dropped"),
        _ => {}
    }
    let Some(path) = &record.path else {
        return missing("dropped");
    };
    match std::fs::read(root.join(path))
        .map_err(|e| OutputError::Image(e.to_string()))
        .and_then(|b| decode_rgb8(&b))
    {
        Ok((width, height, rgb)) => SheetCell {
            point,
            content: CellContent::Image { width, height, rgb },
        },
        Err(_) => missing("unreadable"),
    }
}

/// A job's contact sheet from manifest records (records of other jobs are ignored), titled
/// with the job's name, laid out by [`sheet_axes`]; images are read from under `root`.
pub fn job_sheet(job: &Job, records: &[ManifestRecord], root: &Path) -> Sheet {
    let prompts: Vec<String> = job.prompts.iter().map(|p| p.prompt.clone()).collect();
    let (x, y) = sheet_axes(&job.grid, &prompts, &job.seeds);
    let cells: Vec<SheetCell> = records
        .iter()
        .filter(|r| r.job == job.name)
        .map(|r| record_cell(r, root))
        .collect();
    contact_sheet(&cells, x.as_ref(), y.as_ref(), &job.name)
}

/// Wraps `text` to lines of at most `width` characters (at word boundaries when it can), at
/// most `max_lines` lines, the last one ending in `..` when text was cut.
fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let cur_len = cur.chars().count();
            let need = if cur.is_empty() {
                word.len()
            } else {
                cur_len + 1 + word.len()
            };
            if need <= width {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.extend(word.iter());
                break;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
                continue;
            }
            // A word longer than a line: split it.
            let rest = word.split_off(width);
            lines.push(word.iter().collect());
            word = rest;
            if word.is_empty() {
                break;
            }
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            let mut chars: Vec<char> = last.chars().collect();
            chars.truncate(width.saturating_sub(2));
            *last = chars.into_iter().collect::<String>().trim_end().to_string() + "..";
        }
    }
    lines
}

/// `(width, height)` of an image cell whose buffer matches its size.
fn valid_image(content: &CellContent) -> Option<(u32, u32)> {
    match content {
        CellContent::Image { width, height, rgb }
            if *width > 0 && *height > 0 && rgb.len() == *width as usize * *height as usize * 3 =>
        {
            Some((*width, *height))
        }
        _ => None,
    }
}

/// A canvas with clipped drawing.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        let mut px = vec![0u8; w * h * 3];
        for p in px.chunks_exact_mut(3) {
            p.copy_from_slice(&BACKGROUND);
        }
        Self { w, h, px }
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, color: [u8; 3]) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                let i = (yy * self.w + xx) * 3;
                self.px[i..i + 3].copy_from_slice(&color);
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, text: &str, color: [u8; 3]) {
        for (n, c) in text.chars().enumerate() {
            let gx = x + n * ADVANCE;
            let gy = if descends(c) { y + 2 * SCALE } else { y };
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        self.fill(gx + col * SCALE, gy + row * SCALE, SCALE, SCALE, color);
                    }
                }
            }
        }
    }

    /// Lines of text centred horizontally in a box of width `w` starting at `x`.
    fn text_centered(&mut self, x: usize, y: usize, w: usize, lines: &[String], color: [u8; 3]) {
        for (i, line) in lines.iter().enumerate() {
            let tw = line.chars().count() * ADVANCE;
            let lx = x + w.saturating_sub(tw) / 2;
            self.text(lx, y + i * LINE_H, line, color);
        }
    }

    /// Copies an `iw`×`ih` RGB8 image (`raw`, row-major) with its top-left at (x, y), clipped.
    fn blit(&mut self, x: usize, y: usize, iw: usize, ih: usize, raw: &[u8]) {
        if raw.len() < iw * ih * 3 || x >= self.w {
            return;
        }
        for yy in 0..ih {
            if y + yy >= self.h {
                break;
            }
            let n = iw.min(self.w.saturating_sub(x));
            let src = &raw[yy * iw * 3..(yy * iw + n) * 3];
            let d = ((y + yy) * self.w + x) * 3;
            self.px[d..d + n * 3].copy_from_slice(src);
        }
    }
}

/// Renders a contact sheet: `title` on top, X labels above the columns, Y labels left of the
/// rows, each cell's image scaled to a common height (128..=256 px, 128 beyond 36 cells;
/// upscaled with nearest, downscaled with a triangle filter) and centred in its cell. A cell
/// whose point is not on an axis is left out; a slot with no cell is drawn as a light tile
/// saying `missing`; a [`CellContent::Missing`] cell (or an image whose buffer does not match
/// its size) as a grey tile with its word. Without an X (Y) axis the sheet has one column (row).
pub fn contact_sheet(
    cells: &[SheetCell],
    x_axis: Option<&Axis>,
    y_axis: Option<&Axis>,
    title: &str,
) -> Sheet {
    let cols = x_axis.map_or(1, |a| a.len().max(1));
    let rows = y_axis.map_or(1, |a| a.len().max(1));

    // Cell size from the sizes of the valid images (a buffer that does not match its size
    // draws as "bad image").
    let sizes: Vec<(u32, u32)> = cells
        .iter()
        .filter_map(|c| valid_image(&c.content))
        .collect();
    let max_h = sizes.iter().map(|&(_, h)| h).max().unwrap_or(MIN_CELL_H);
    let max_cell_h = if cols * rows > MANY_CELLS {
        MIN_CELL_H
    } else {
        MAX_CELL_H
    };
    let cell_h = max_h.clamp(MIN_CELL_H, max_cell_h);
    let scaled_w = |(w, h): (u32, u32)| -> u32 {
        ((f64::from(w) * f64::from(cell_h) / f64::from(h)).round() as u32).clamp(1, cell_h * 4)
    };
    let cell_w = sizes
        .iter()
        .map(|&s| scaled_w(s))
        .max()
        .unwrap_or(MIN_CELL_H)
        .max(MIN_CELL_H);
    let (cw, ch) = (cell_w as usize, cell_h as usize);

    // Label bands.
    let x_chars = (cw / ADVANCE).max(1);
    let x_labels: Vec<Vec<String>> = match x_axis {
        Some(a) => (0..a.len())
            .map(|i| wrap(&a.label(i), x_chars, MAX_X_LABEL_LINES))
            .collect(),
        None => Vec::new(),
    };
    let x_label_lines = x_labels.iter().map(Vec::len).max().unwrap_or(0);
    let x_band = if x_label_lines > 0 {
        x_label_lines * LINE_H + PAD
    } else {
        0
    };

    let y_lines_fit = (ch / LINE_H).max(1);
    let y_labels: Vec<Vec<String>> = match y_axis {
        Some(a) => (0..a.len())
            .map(|i| {
                // Each field on its own lines where they fit, else the whole label wrapped.
                let mut lines = Vec::new();
                for part in a.label_parts(i) {
                    lines.extend(wrap(&part, MAX_Y_LABEL_CHARS, y_lines_fit));
                }
                if lines.len() > y_lines_fit {
                    lines = wrap(&a.label(i), MAX_Y_LABEL_CHARS, y_lines_fit);
                }
                lines
            })
            .collect(),
        None => Vec::new(),
    };
    let y_chars = y_labels
        .iter()
        .flatten()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    let y_band = if y_chars > 0 {
        y_chars * ADVANCE + PAD
    } else {
        0
    };

    let grid_w = cols * cw + (cols - 1) * GAP;
    let grid_h = rows * ch + (rows - 1) * GAP;
    let width = PAD + y_band + grid_w + PAD;
    let title_chars = (width.saturating_sub(2 * PAD) / ADVANCE).max(1);
    let title_lines = if title.trim().is_empty() {
        Vec::new()
    } else {
        wrap(title, title_chars, 2)
    };
    let title_band = if title_lines.is_empty() {
        0
    } else {
        title_lines.len() * LINE_H + PAD
    };
    let height = PAD + title_band + x_band + grid_h + PAD;

    let mut canvas = Canvas::new(width, height);
    for (i, line) in title_lines.iter().enumerate() {
        canvas.text(PAD, PAD + i * LINE_H, line, INK);
    }
    let gx = PAD + y_band;
    let gy = PAD + title_band + x_band;
    for (c, lines) in x_labels.iter().enumerate() {
        // Bottom-aligned, just above the grid.
        let y = gy - PAD - lines.len() * LINE_H;
        canvas.text_centered(gx + c * (cw + GAP), y, cw, lines, INK);
    }
    for (r, lines) in y_labels.iter().enumerate() {
        let y = gy + r * (ch + GAP) + ch.saturating_sub(lines.len() * LINE_H) / 2;
        for (i, line) in lines.iter().enumerate() {
            canvas.text(PAD, y + i * LINE_H, line, INK);
        }
    }

    // Which cell fills each slot.
    let mut slots: Vec<Option<&SheetCell>> = vec![None; cols * rows];
    for cell in cells {
        let c = match x_axis {
            Some(a) => a.index_of(&cell.point),
            None => Some(0),
        };
        let r = match y_axis {
            Some(a) => a.index_of(&cell.point),
            None => Some(0),
        };
        if let (Some(c), Some(r)) = (c, r) {
            if c < cols && r < rows {
                slots[r * cols + c] = Some(cell);
            }
        }
    }
    for r in 0..rows {
        for c in 0..cols {
            let (x, y) = (gx + c * (cw + GAP), gy + r * (ch + GAP));
            let tile = |canvas: &mut Canvas, color, word: &str| {
                canvas.fill(x, y, cw, ch, color);
                let lines = wrap(word, x_chars, 2);
                let ty = y + ch.saturating_sub(lines.len() * LINE_H) / 2;
                canvas.text_centered(x, ty, cw, &lines, INK);
            };
            match slots[r * cols + c].map(|s| &s.content) {
                None => tile(&mut canvas, EMPTY_TILE, "missing"),
                Some(CellContent::Missing(word)) => tile(&mut canvas, MISSING_TILE, word),
                Some(content @ CellContent::Image { rgb, .. }) => match valid_image(content) {
                    Some((iw, ih)) => {
                        let nw = scaled_w((iw, ih));
                        let ox = x + cw.saturating_sub(nw as usize) / 2;
                        if (nw, cell_h) == (iw, ih) {
                            canvas.blit(ox, y, iw as usize, ih as usize, rgb);
                        } else {
                            let filter = if cell_h >= ih {
                                FilterType::Nearest
                            } else {
                                FilterType::Triangle
                            };
                            // Borrowed view: no copy of the full-size image.
                            if let Some(view) = ImageBuffer::<Rgb<u8>, &[u8]>::from_raw(iw, ih, rgb)
                            {
                                let thumb = imageops::resize(&view, nw, cell_h, filter);
                                canvas.blit(ox, y, nw as usize, cell_h as usize, thumb.as_raw());
                            }
                        }
                    }
                    None => tile(&mut canvas, MISSING_TILE, "bad image"),
                },
            }
        }
    }

    Sheet {
        width: width as u32,
        height: height as u32,
        rgb: canvas.px,
        cell_width: cell_w,
        cell_height: cell_h,
        grid_x: gx as u32,
        grid_y: gy as u32,
        columns: cols as u32,
        rows: rows as u32,
        gap: GAP as u32,
        title_height: title_band as u32,
        x_label_height: x_band as u32,
        y_label_width: y_band as u32,
    }
}

/// Encodes an RGB8 image as a plain PNG (no metadata).
pub fn encode_plain_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, OutputError> {
    encode_rgb_png(width, height, rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_splits_and_truncates() {
        assert_eq!(wrap("guidance: 7.5", 10, 3), vec!["guidance:", "7.5"]);
        assert_eq!(wrap("abcdefghijkl", 5, 3), vec!["abcde", "fghij", "kl"]);
        assert_eq!(wrap("aa bb cc dd ee", 5, 2), vec!["aa bb", "cc.."]);
        assert!(wrap("", 5, 2).is_empty());
    }

    #[test]
    fn axis_product_and_lookup() {
        let a = Axis::new("steps", vec!["20".into(), "30".into()]);
        let b = Axis::new(
            "scheduler",
            vec!["ddim".into(), "euler_a".into(), "pndm".into()],
        );
        let p = Axis::product(&[a, b]).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p.label(4), "steps: 30, scheduler: euler_a");
        let point = vec![
            ("scheduler".to_string(), "euler_a".to_string()),
            ("steps".to_string(), "30".to_string()),
        ];
        assert_eq!(p.index_of(&point), Some(4));
        assert_eq!(p.index_of(&point[..1]), None);
    }

    #[test]
    fn bad_buffers_and_unplaced_cells_do_not_panic() {
        let cells = vec![
            SheetCell {
                point: vec![("seed".into(), "1".into())],
                content: CellContent::Image {
                    width: 10,
                    height: 10,
                    rgb: vec![0; 7],
                },
            },
            // Not on the axis: left out.
            SheetCell {
                point: vec![("seed".into(), "99".into())],
                content: CellContent::Image {
                    width: 2,
                    height: 2,
                    rgb: vec![0; 12],
                },
            },
        ];
        let x = Axis::new("seed", vec!["1".into(), "2".into()]);
        let sheet = contact_sheet(&cells, Some(&x), None, "t");
        assert_eq!((sheet.columns, sheet.rows, sheet.cell_height), (2, 1, 128));
        let px = |x: u32, y: u32| {
            let i = ((y * sheet.width + x) * 3) as usize;
            [sheet.rgb[i], sheet.rgb[i + 1], sheet.rgb[i + 2]]
        };
        assert_eq!(px(sheet.grid_x + 1, sheet.grid_y + 1), MISSING_TILE);
        let second = sheet.grid_x + sheet.cell_width + sheet.gap + 1;
        assert_eq!(px(second, sheet.grid_y + 1), EMPTY_TILE);
    }
}
