//! After a run: one labelled contact sheet per job with a grid, and `report.html` over every
//! image of the campaign.

use std::collections::HashSet;

use super::campaign::Campaign;
use crate::output::contact_sheet::{contact_sheet, record_cell, sheet_axes, SheetCell};
use crate::output::png_meta::encode_rgb_png;
use crate::output::report::report_html;
use crate::output::ManifestRecord;

/// Writes `sheets/<job>.png` for each job with a grid and `report.html`; returns their paths.
pub fn write_gallery(c: &Campaign) -> Result<Vec<String>, String> {
    let _ = c.store.refresh();
    let mut records: Vec<ManifestRecord> = Vec::new();
    let mut seen = HashSet::new();
    for key in &c.keys {
        if !seen.insert(key.as_str()) {
            continue;
        }
        if let Some(r) = c.store.record(key) {
            records.push(r);
        }
    }
    let mut sheets = Vec::new();
    let mut written = Vec::new();
    for job in &c.spec.jobs {
        if job.grid.is_empty() {
            continue;
        }
        let prompts: Vec<String> = job.prompts.iter().map(|p| p.prompt.clone()).collect();
        let (x, y) = sheet_axes(&job.grid, &prompts, &job.seeds);
        let cells: Vec<SheetCell> = records
            .iter()
            .filter(|r| r.job == job.name)
            .map(|r| record_cell(r, c.store.root()))
            .collect();
        let sheet = contact_sheet(
            &cells,
            x.as_ref(),
            y.as_ref(),
            &format!("{} ({})", job.name, job.model),
        );
        let png =
            encode_rgb_png(sheet.width, sheet.height, &sheet.rgb).map_err(|e| e.to_string())?;
        let rel = format!("sheets/{}.png", job.name);
        let path = c.store.root().join(&rel);
        // Atomic (temp file + rename): shards of one campaign write these at the same time.
        crate::cache::write_atomic(&path, &png).map_err(|e| e.to_string())?;
        sheets.push((job.name.clone(), rel.clone()));
        written.push(rel);
    }
    let html = report_html(&records, &sheets);
    let path = c.store.root().join("report.html");
    crate::cache::write_atomic(&path, html.as_bytes()).map_err(|e| e.to_string())?;
    written.push("report.html".into());
    Ok(written)
}
