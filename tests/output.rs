//! Output stage: PNG metadata round trip, contact sheets, the HTML report.

use std::collections::BTreeMap;
use std::io::Cursor;

use sd_run::output::contact_sheet::{record_point, sheet_axes};
use sd_run::output::png_meta::read_record;
use sd_run::output::{
    black, blur, contact_sheet, encode_plain_png, encode_png, job_sheet, parse_parameters,
    read_text_chunks, report_html, to_rgb8, Axis, CellContent, ImageStatus, ManifestRecord,
    SafetyRecord, SheetCell,
};
use sd_run::spec::{GridAxis, RefinerStage};

fn record(job: &str, seed: u64, prompt: &str) -> ManifestRecord {
    ManifestRecord {
        key: format!("{:064x}", seed * 7919 + job.len() as u64),
        path: Some(format!("{job}/{seed:06}.png")),
        file_sha256: Some("ab".repeat(32)),
        job: job.into(),
        model: "sd15".into(),
        prompt: prompt.into(),
        negative_prompt: String::new(),
        seed,
        steps: 25,
        guidance: 7.5,
        scheduler: "dpmpp_2m_karras".into(),
        width: 64,
        height: 48,
        noise: "torch-cpu".into(),
        refiner: None,
        safety: SafetyRecord {
            checked: true,
            flagged: false,
            action: None,
            scores: BTreeMap::new(),
        },
        status: ImageStatus::Ok,
        seconds: 1.25,
        model_hash: "6ce0161689".into(),
        grid: vec![],
        error: None,
    }
}

fn gradient(w: u32, h: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for y in 0..h {
        for x in 0..w {
            v.extend_from_slice(&[(x * 4) as u8, (y * 5) as u8, ((x + y) * 3) as u8]);
        }
    }
    v
}

fn solid(w: u32, h: u32, c: [u8; 3]) -> Vec<u8> {
    c.iter()
        .copied()
        .cycle()
        .take((w * h * 3) as usize)
        .collect()
}

#[test]
fn png_round_trip_with_metadata() {
    let mut rec = record(
        "mascots",
        1234567890123,
        "a red fox mascot, flat vector: cute",
    );
    rec.negative_prompt = "text, watermark".into();
    rec.grid = vec![
        ("guidance".into(), "7.5".into()),
        ("scheduler".into(), "ddim".into()),
    ];
    rec.refiner = Some(RefinerStage {
        model: "refiner".into(),
        switch_at: 0.8,
    });
    rec.safety.scores.insert("concept_0".into(), -0.031);
    rec.model = "my, model".into();
    let (w, h) = (64, 48);
    let rgb = gradient(w, h);
    let bytes = encode_png(w, h, &rgb, &rec).unwrap();

    // Pixels through the png crate's own decoder.
    let mut reader = png::Decoder::new(Cursor::new(&bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
    // Both are tEXt chunks.
    let keys: Vec<_> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| t.keyword.clone())
        .collect();
    assert_eq!(keys, vec!["parameters", "sd-run"]);

    let chunks = read_text_chunks(&bytes).unwrap();
    let get = |k: &str| {
        chunks
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let back: ManifestRecord = serde_json::from_str(&get("sd-run")).unwrap();
    assert_eq!(back, rec);
    assert!(!get("sd-run").contains('\n'));
    assert_eq!(read_record(&bytes).unwrap(), Some(rec.clone()));

    let text = get("parameters");
    let p = parse_parameters(&text).unwrap();
    assert_eq!(p.prompt, rec.prompt);
    assert_eq!(p.negative_prompt, "text, watermark");
    assert_eq!(p.get("Steps"), Some("25"));
    assert_eq!(p.get("Sampler"), Some("DPM++ 2M Karras"));
    assert_eq!(p.get("CFG scale"), Some("7.5"));
    assert_eq!(p.get("Seed"), Some("1234567890123"));
    assert_eq!(p.get("Size"), Some("64x48"));
    assert_eq!(p.get("Model hash"), Some("6ce0161689"));
    assert_eq!(p.get("Model"), Some("my, model"));
    assert!(text.contains("Model: \"my, model\""), "{text}");
    assert_eq!(p.get("Refiner"), Some("refiner"));
    assert_eq!(p.get("Refiner switch at"), Some("0.8"));
    assert_eq!(p.get("RNG"), Some("CPU"));
    assert!(p.get("Version").unwrap().starts_with("sd-run "));
    // A1111 layout: prompt, negative, parameters.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[2].starts_with("Steps: 25, Sampler: DPM++ 2M Karras, "));
}

#[test]
fn png_without_negative_and_with_unicode() {
    let mut rec = record("j", 1, "猫 a cat, «chat» 🐱");
    rec.scheduler = "euler_a".into();
    rec.guidance = 7.0;
    let bytes = encode_png(4, 2, &gradient(4, 2), &rec).unwrap();
    let chunks = read_text_chunks(&bytes).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert_eq!(
        params.lines().count(),
        2,
        "no Negative prompt line: {params}"
    );
    let p = parse_parameters(params).unwrap();
    assert_eq!(p.prompt, rec.prompt);
    assert_eq!(p.negative_prompt, "");
    assert_eq!(p.get("Sampler"), Some("Euler a"));
    assert_eq!(p.get("CFG scale"), Some("7.0"));
    let json = &chunks.iter().find(|(k, _)| k == "sd-run").unwrap().1;
    assert!(json.is_ascii());
    assert_eq!(serde_json::from_str::<ManifestRecord>(json).unwrap(), rec);
}

#[test]
fn png_rejects_bad_buffers() {
    let rec = record("j", 1, "p");
    assert!(encode_png(4, 4, &[0; 47], &rec).is_err());
    assert!(encode_png(0, 4, &[], &rec).is_err());
    assert!(encode_plain_png(2, 2, &[0; 11]).is_err());
    assert!(read_text_chunks(b"not a png").is_err());
}

#[test]
fn pixels_and_safety_actions() {
    assert_eq!(
        to_rgb8(&[0.5, 128.5 / 255.0, 2.0, f32::NAN, -0.1]),
        vec![128, 128, 255, 0, 0]
    );
    let (w, h) = (40, 40);
    let mut img: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let v = if ((i % w) / 2 + (i / w) / 2) % 2 == 0 {
                255
            } else {
                0
            };
            [v, v, v]
        })
        .collect();
    blur(w, h, &mut img);
    let (lo, hi) = img.iter().fold((255, 0), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(hi - lo < 16, "{lo}..{hi}");
    black(&mut img);
    assert!(img.iter().all(|&v| v == 0));
}

fn is_bg(rgb: &[u8], w: u32, x: u32, y: u32) -> bool {
    let i = ((y * w + x) * 3) as usize;
    rgb[i..i + 3] == [255, 255, 255]
}

#[test]
fn contact_sheet_layout_and_labels() {
    let x = Axis::new("guidance", vec!["5".into(), "7.5".into(), "9".into()]);
    let y = Axis::new("steps", vec!["20".into(), "30".into()]);
    let colors = [
        [200, 30, 30],
        [30, 200, 30],
        [30, 30, 200],
        [200, 200, 30],
        [30, 200, 200],
    ];
    let mut cells = Vec::new();
    let mut k = 0;
    for s in ["20", "30"] {
        for g in ["5", "7.5", "9"] {
            let point = vec![
                ("guidance".to_string(), g.to_string()),
                ("steps".to_string(), s.to_string()),
            ];
            let content = if (s, g) == ("30", "9") {
                CellContent::Missing("dropped".into())
            } else {
                let c = colors[k];
                k += 1;
                CellContent::Image {
                    width: 64,
                    height: 64,
                    rgb: solid(64, 64, c),
                }
            };
            cells.push(SheetCell { point, content });
        }
    }
    let sheet = contact_sheet(&cells, Some(&x), Some(&y), "mascots");
    assert_eq!((sheet.columns, sheet.rows), (3, 2));
    // Small images are upscaled to the minimum cell height.
    assert_eq!((sheet.cell_width, sheet.cell_height), (128, 128));
    let margin = sheet.grid_x - sheet.y_label_width;
    assert_eq!(sheet.width, sheet.grid_x + 3 * 128 + 2 * sheet.gap + margin);
    assert_eq!(sheet.height, sheet.grid_y + 2 * 128 + sheet.gap + margin);
    assert_eq!(
        sheet.grid_y,
        margin + sheet.title_height + sheet.x_label_height
    );
    assert!(sheet.title_height > 0 && sheet.x_label_height > 0 && sheet.y_label_width > 0);
    assert_eq!(sheet.rgb.len(), (sheet.width * sheet.height * 3) as usize);

    let px = |x: u32, y: u32| {
        let i = ((y * sheet.width + x) * 3) as usize;
        [sheet.rgb[i], sheet.rgb[i + 1], sheet.rgb[i + 2]]
    };
    // Cell (row 1, col 1) is the 5th image: steps 30, guidance 7.5.
    let step = sheet.cell_width + sheet.gap;
    assert_eq!(
        px(sheet.grid_x + step + 3, sheet.grid_y + step + 3),
        colors[4]
    );
    assert_eq!(px(sheet.grid_x + 5, sheet.grid_y + 5), colors[0]);
    // The dropped cell is a grey tile.
    assert_eq!(
        px(sheet.grid_x + 2 * step + 2, sheet.grid_y + step + 2),
        [150, 150, 150]
    );

    // Labels: ink in the X label band and in the Y label band.
    let x_band_y = sheet.grid_y - sheet.x_label_height;
    let x_ink = (x_band_y..sheet.grid_y)
        .flat_map(|yy| (sheet.grid_x..sheet.grid_x + 128).map(move |xx| (xx, yy)))
        .filter(|&(xx, yy)| !is_bg(&sheet.rgb, sheet.width, xx, yy))
        .count();
    assert!(x_ink > 50, "x label ink {x_ink}");
    let y_ink = (sheet.grid_y..sheet.grid_y + 128)
        .flat_map(|yy| (margin..sheet.grid_x).map(move |xx| (xx, yy)))
        .filter(|&(xx, yy)| !is_bg(&sheet.rgb, sheet.width, xx, yy))
        .count();
    assert!(y_ink > 50, "y label ink {y_ink}");
    let title_ink = (margin..margin + sheet.title_height)
        .flat_map(|yy| (margin..sheet.width - margin).map(move |xx| (xx, yy)))
        .filter(|&(xx, yy)| !is_bg(&sheet.rgb, sheet.width, xx, yy))
        .count();
    assert!(title_ink > 20);

    let png = encode_plain_png(sheet.width, sheet.height, &sheet.rgb).unwrap();
    let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(decoded.as_raw(), &sheet.rgb);
}

#[test]
fn contact_sheet_without_axes_and_with_many_axes() {
    // One image, no axes, large: downscaled to the maximum cell height.
    let cells = vec![SheetCell {
        point: vec![],
        content: CellContent::Image {
            width: 600,
            height: 400,
            rgb: gradient(600, 400),
        },
    }];
    let sheet = contact_sheet(&cells, None, None, "");
    assert_eq!((sheet.columns, sheet.rows), (1, 1));
    assert_eq!((sheet.cell_width, sheet.cell_height), (384, 256));
    assert_eq!(
        sheet.title_height + sheet.x_label_height + sheet.y_label_width,
        0
    );
    assert_eq!(sheet.width, sheet.grid_x * 2 + 384);

    // Three grid axes, two prompts, two seeds: X = first axis, Y = everything else.
    let grid = vec![
        GridAxis {
            field: "guidance".into(),
            values: vec!["5".into(), "7.5".into()],
        },
        GridAxis {
            field: "steps".into(),
            values: vec!["20".into(), "30".into()],
        },
        GridAxis {
            field: "scheduler".into(),
            values: vec!["ddim".into(), "euler_a".into(), "pndm".into()],
        },
    ];
    let prompts = vec!["a fox".to_string(), "an owl".to_string()];
    let seeds = [1u64, 2];
    let (xa, ya) = sheet_axes(&grid, &prompts, &seeds);
    let (xa, ya) = (xa.unwrap(), ya.unwrap());
    assert_eq!(xa.len(), 2);
    assert_eq!(ya.len(), 2 * 3 * 2 * 2);
    let mut cells = Vec::new();
    for g in ["5", "7.5"] {
        for st in ["20", "30"] {
            for sc in ["ddim", "euler_a", "pndm"] {
                for p in &prompts {
                    for s in seeds {
                        let mut r = record("j", s, p);
                        r.grid = vec![
                            ("guidance".into(), g.into()),
                            ("steps".into(), st.into()),
                            ("scheduler".into(), sc.into()),
                        ];
                        cells.push(SheetCell {
                            point: record_point(&r),
                            content: CellContent::Image {
                                width: 8,
                                height: 8,
                                rgb: solid(8, 8, [9, 9, 9]),
                            },
                        });
                    }
                }
            }
        }
    }
    let sheet = contact_sheet(&cells, Some(&xa), Some(&ya), "j");
    assert_eq!((sheet.columns, sheet.rows), (2, 24));
    // Every slot got its image: no "missing" tile colour at any cell corner.
    for r in 0..24 {
        for c in 0..2 {
            let x = sheet.grid_x + c * (sheet.cell_width + sheet.gap) + 1;
            let y = sheet.grid_y + r * (sheet.cell_height + sheet.gap) + 1;
            let i = ((y * sheet.width + x) * 3) as usize;
            assert_eq!(&sheet.rgb[i..i + 3], &[9, 9, 9], "cell {r},{c}");
        }
    }
    // No grid: seeds across, prompts down.
    let (xa, ya) = sheet_axes(&[], &prompts, &seeds);
    assert_eq!(xa.unwrap().fields, vec!["seed"]);
    assert_eq!(ya.unwrap().fields, vec!["prompt"]);
    assert_eq!(sheet_axes(&[], &prompts[..1], &seeds[..1]), (None, None));
}

fn report_records() -> Vec<ManifestRecord> {
    let mut ok = record(
        "mascots",
        1,
        "a red fox mascot <script>alert(1)</script> & co",
    );
    ok.negative_prompt = "\"quoted\" 'neg'".into();
    let mut flagged = record("mascots", 2, "a blue owl");
    flagged.status = ImageStatus::Flagged;
    flagged.safety.flagged = true;
    flagged.safety.action = Some("blur".into());
    flagged.path = Some("mascots/000002 blurred.png".into());
    let mut dropped = record("alpine", 3, "alpine meadow");
    dropped.status = ImageStatus::Flagged;
    dropped.safety.flagged = true;
    dropped.safety.action = Some("drop".into());
    dropped.path = None;
    let mut quarantined = record("alpine", 4, "alpine lake");
    quarantined.status = ImageStatus::Flagged;
    quarantined.safety.flagged = true;
    quarantined.safety.action = Some("quarantine".into());
    quarantined.path = Some("quarantine/secret-quarantined.png".into());
    quarantined.key = "feedface".repeat(8);
    let mut failed = record("alpine", 5, "alpine hut");
    failed.status = ImageStatus::Failed;
    failed.path = None;
    failed.error = Some("CUDA out of memory <oops>".into());
    vec![ok, flagged, dropped, quarantined, failed]
}

#[test]
fn report_lists_escapes_and_hides_quarantine() {
    let recs = report_records();
    let sheets = vec![(
        "mascots".to_string(),
        "mascots/contact_sheet.png".to_string(),
    )];
    let html = report_html(&recs, &sheets);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("src=\"mascots/000001.png\""));
    assert!(html.contains("src=\"mascots/000002%20blurred.png\""));
    assert!(html.contains("src=\"mascots/contact_sheet.png\""));
    assert!(html.contains("loading=\"lazy\""));
    // User text is escaped.
    assert!(!html.contains("<script>alert"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"));
    assert!(html.contains("&quot;quoted&quot; &#39;neg&#39;"));
    assert!(html.contains("CUDA out of memory &lt;oops&gt;"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only the page's own script"
    );
    // Quarantined: listed by key, never linked or shown.
    assert!(html.contains(&"feedface".repeat(8)));
    assert!(!html.contains("secret-quarantined"));
    // Counts and placeholders.
    assert!(html.contains("images <b>5</b>"));
    assert!(html.contains("flagged <b>3</b>"));
    assert!(html.contains("failed <b>1</b>"));
    assert!(html.contains("quarantined <b>1</b>"));
    assert!(html.contains("<b>dropped</b>"));
    assert!(html.contains("<b>failed</b>"));
    assert!(html.contains("FLAGGED (blur)"));
    // Job filter offers every job.
    assert!(
        html.contains("<option value=\"alpine\">") && html.contains("<option value=\"mascots\">")
    );
}

/// Writes a small output root (PNGs, a contact sheet, report.html) under the target's tmp dir
/// so it can be looked at (e.g. with a headless browser); checks the files read back.
#[test]
fn demo_output_root() {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("output-demo");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("mascots")).unwrap();
    let recs = report_records();
    let x = Axis::new("seed", vec!["1".into(), "2".into(), "3".into()]);
    let mut cells = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let (w, h) = (r.width, r.height);
        let mut rgb = gradient(w, h);
        rgb.iter_mut()
            .for_each(|v| *v = v.wrapping_add((i * 60) as u8));
        if r.safety.action.as_deref() == Some("blur") {
            blur(w, h, &mut rgb);
        }
        if let Some(path) = &r.path {
            if !path.starts_with("quarantine") {
                let bytes = encode_png(w, h, &rgb, r).unwrap();
                std::fs::write(root.join(path), &bytes).unwrap();
            }
        }
        if r.job == "mascots" || r.seed == 3 {
            let content = if r.path.is_some() {
                CellContent::Image {
                    width: w,
                    height: h,
                    rgb,
                }
            } else {
                CellContent::Missing("dropped".into())
            };
            cells.push(SheetCell {
                point: vec![("seed".into(), r.seed.to_string())],
                content,
            });
        }
    }
    let sheet = contact_sheet(&cells, Some(&x), None, "mascots: a red fox mascot");
    std::fs::write(
        root.join("mascots/contact_sheet.png"),
        encode_plain_png(sheet.width, sheet.height, &sheet.rgb).unwrap(),
    )
    .unwrap();
    // A 3-axis grid sheet of larger images, with long labels (downscaled thumbnails).
    let grid = vec![
        GridAxis {
            field: "scheduler".into(),
            values: vec!["ddim".into(), "dpmpp_2m_karras".into()],
        },
        GridAxis {
            field: "guidance".into(),
            values: vec!["5".into(), "7.5".into()],
        },
    ];
    let prompts = vec![
        "a very long prompt about a red fox mascot, flat vector, trending".to_string(),
        "an owl".to_string(),
    ];
    let (xa, ya) = sheet_axes(&grid, &prompts, &[7]);
    let mut cells = Vec::new();
    let mut n = 0u8;
    for sc in ["ddim", "dpmpp_2m_karras"] {
        for g in ["5", "7.5"] {
            for p in &prompts {
                n += 1;
                let mut r = record("grid", 7, p);
                r.grid = vec![
                    ("scheduler".into(), sc.into()),
                    ("guidance".into(), g.into()),
                ];
                let mut rgb = gradient(512, 384);
                rgb.iter_mut().for_each(|v| *v = v.wrapping_add(n * 40));
                let content = if n == 3 {
                    CellContent::Missing("failed".into())
                } else {
                    CellContent::Image {
                        width: 512,
                        height: 384,
                        rgb,
                    }
                };
                cells.push(SheetCell {
                    point: record_point(&r),
                    content,
                });
            }
        }
    }
    let sheet = contact_sheet(
        &cells,
        xa.as_ref(),
        ya.as_ref(),
        "grid: 3 axes folded into rows",
    );
    assert_eq!((sheet.columns, sheet.rows, sheet.cell_height), (2, 4, 256));
    std::fs::write(
        root.join("grid_sheet.png"),
        encode_plain_png(sheet.width, sheet.height, &sheet.rgb).unwrap(),
    )
    .unwrap();
    let html = report_html(
        &recs,
        &[
            ("mascots".into(), "mascots/contact_sheet.png".into()),
            ("grid".into(), "grid_sheet.png".into()),
        ],
    );
    std::fs::write(root.join("report.html"), &html).unwrap();
    for r in &recs {
        if let Some(p) = &r.path {
            if !p.starts_with("quarantine") {
                let bytes = std::fs::read(root.join(p)).unwrap();
                assert_eq!(read_record(&bytes).unwrap().as_ref(), Some(r));
            }
        }
    }
}

#[test]
fn job_sheet_reads_the_records_pngs() {
    use sd_run::output::contact_sheet::record_cell;
    use sd_run::spec::{GenParams, Job, PromptEntry};
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("job-sheet");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("j")).unwrap();
    let job = Job {
        name: "j".into(),
        model: "sd15".into(),
        prompts: vec![PromptEntry {
            prompt: "a fox".into(),
            negative_prompt: None,
        }],
        seeds: vec![1, 2],
        grid: vec![GridAxis {
            field: "steps".into(),
            values: vec!["20".into(), "30".into()],
        }],
        params: GenParams::default(),
    };
    let colors = [[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]];
    let mut recs = Vec::new();
    let mut i = 0;
    for steps in ["20", "30"] {
        for seed in [1u64, 2] {
            let mut r = record("j", seed, "a fox");
            r.grid = vec![("steps".into(), steps.into())];
            r.path = Some(format!("j/{steps}-{seed}.png"));
            let png =
                encode_png(r.width, r.height, &solid(r.width, r.height, colors[i]), &r).unwrap();
            std::fs::write(root.join(r.path.as_ref().unwrap()), png).unwrap();
            recs.push(r);
            i += 1;
        }
    }
    // steps 30 / seed 2 was quarantined: its file exists but the sheet must not show it.
    recs[3].safety.flagged = true;
    recs[3].safety.action = Some("quarantine".into());
    recs.push(record("other-job", 1, "ignored"));
    let sheet = job_sheet(&job, &recs, &root);
    // X = steps, Y = seed.
    assert_eq!((sheet.columns, sheet.rows), (2, 2));
    let at = |c: u32, r: u32| {
        let x = sheet.grid_x + c * (sheet.cell_width + sheet.gap) + sheet.cell_width / 2;
        let y = sheet.grid_y + r * (sheet.cell_height + sheet.gap) + 2;
        let i = ((y * sheet.width + x) * 3) as usize;
        [sheet.rgb[i], sheet.rgb[i + 1], sheet.rgb[i + 2]]
    };
    assert_eq!(at(0, 0), colors[0]); // steps 20, seed 1
    assert_eq!(at(0, 1), colors[1]); // steps 20, seed 2
    assert_eq!(at(1, 0), colors[2]); // steps 30, seed 1
    assert_eq!(at(1, 1), [150, 150, 150]); // quarantined: grey tile
    assert_eq!(
        record_cell(&recs[3], &root).content,
        CellContent::Missing("quarantined".into())
    );
    let mut gone = recs[0].clone();
    gone.path = Some("j/nope.png".into());
    assert_eq!(
        record_cell(&gone, &root).content,
        CellContent::Missing("unreadable".into())
    );
}
