//! `report.html`: a self-contained page over the output root (no server, no external files):
//! counts, a job filter and a text filter, a gallery with every image's parameters and safety
//! verdict, quarantined keys listed (never shown), and each job's contact sheet.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{ImageStatus, ManifestRecord};

/// HTML-escapes text for element content and quoted attributes.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Percent-encodes a relative path for use as a URL (keeps `/` and unreserved characters).
pub fn url_path(path: &str) -> String {
    let path = path.replace('\\', "/");
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// How a record appears in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Image,
    Dropped,
    Failed,
    Quarantined,
}

fn shown(r: &ManifestRecord) -> Shown {
    let action = r.safety.action.as_deref();
    if r.status == ImageStatus::Failed {
        Shown::Failed
    } else if r.safety.flagged && action == Some("quarantine") {
        Shown::Quarantined
    } else if (r.safety.flagged && action == Some("drop")) || r.path.is_none() {
        Shown::Dropped
    } else {
        Shown::Image
    }
}

fn fmt_num(x: f64) -> String {
    format!("{x}")
}

const CSS: &str = r#"
:root { --bg:#f6f6f4; --card:#fff; --ink:#222; --muted:#666; --flag:#c62828; --line:#ddd; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--ink); }
header { position:sticky; top:0; z-index:2; background:#222; color:#eee; padding:10px 18px; display:flex; flex-wrap:wrap; gap:10px 24px; align-items:center; }
header h1 { font-size:18px; margin:0; }
.counts span { margin-right:14px; }
.counts b { color:#fff; }
.counts .flag b { color:#ff8a80; }
.controls { display:flex; gap:8px; margin-left:auto; }
.controls select, .controls input { font:inherit; padding:4px 6px; border-radius:4px; border:1px solid #555; }
.controls input { width:240px; }
main { padding:14px 18px; }
h2 { font-size:16px; margin:18px 0 8px; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill, minmax(220px, 1fr)); gap:12px; }
.card { margin:0; background:var(--card); border:1px solid var(--line); border-radius:6px; overflow:hidden; display:flex; flex-direction:column; }
.card.flagged { border:3px solid var(--flag); }
.card .thumb { display:block; width:100%; height:auto; aspect-ratio:1/1; object-fit:contain; background:#e8e8e8; }
.card .placeholder { width:100%; aspect-ratio:1/1; display:flex; flex-direction:column; align-items:center; justify-content:center; background:repeating-linear-gradient(45deg,#ddd,#ddd 10px,#ccc 10px,#ccc 20px); color:#333; text-align:center; padding:10px; }
.card .placeholder b { font-size:16px; text-transform:uppercase; }
.card figcaption { padding:8px 10px; font-size:12px; }
.card .prompt { font-size:13px; margin-bottom:4px; word-wrap:break-word; }
.card .neg { color:var(--muted); }
.card dl { display:grid; grid-template-columns:auto 1fr; gap:1px 8px; margin:4px 0 0; }
.card dt { color:var(--muted); }
.card dd { margin:0; word-break:break-all; }
.badge { display:inline-block; padding:1px 6px; border-radius:3px; font-size:11px; font-weight:600; background:#e0e0e0; }
.badge.ok { background:#c8e6c9; }
.badge.flagged { background:var(--flag); color:#fff; }
.badge.failed { background:#424242; color:#fff; }
.sheets figure { margin:0 0 18px; }
.sheets img { max-width:100%; border:1px solid var(--line); background:#fff; }
.quarantine code { font-size:12px; }
.hidden { display:none !important; }
.empty { color:var(--muted); }
"#;

const JS: &str = r#"
(function () {
  var job = document.getElementById('job');
  var q = document.getElementById('q');
  function apply() {
    var j = job.value, t = q.value.trim().toLowerCase(), shown = 0;
    document.querySelectorAll('[data-job]').forEach(function (el) {
      var okJob = !j || el.getAttribute('data-job') === j;
      var okText = !t || !el.hasAttribute('data-search') || el.getAttribute('data-search').indexOf(t) >= 0;
      var on = okJob && okText;
      el.classList.toggle('hidden', !on);
      if (on && el.classList.contains('card')) shown++;
    });
    document.getElementById('shown').textContent = shown;
  }
  // `report.html#job=NAME&q=TEXT` opens with these filters set.
  var h = new URLSearchParams(location.hash.slice(1));
  if (h.has('job')) job.value = h.get('job');
  if (h.has('q')) q.value = h.get('q');
  job.addEventListener('change', apply);
  q.addEventListener('input', apply);
  apply();
})();
"#;

fn card(out: &mut String, r: &ManifestRecord, kind: Shown) {
    let flagged = r.safety.flagged;
    let search = format!(
        "{} {} {} seed {} {} {} {}",
        r.job, r.prompt, r.negative_prompt, r.seed, r.scheduler, r.model, r.key
    )
    .to_lowercase();
    let _ = write!(
        out,
        "<figure class=\"card{}\" data-job=\"{}\" data-search=\"{}\">",
        if flagged { " flagged" } else { "" },
        escape_html(&r.job),
        escape_html(&search)
    );
    match (kind, r.path.as_deref()) {
        (Shown::Image, Some(path)) => {
            let src = escape_html(&url_path(path));
            let _ = write!(
                out,
                "<a href=\"{src}\"><img class=\"thumb\" src=\"{src}\" loading=\"lazy\" alt=\"{}\" width=\"{}\" height=\"{}\"></a>",
                escape_html(&r.prompt),
                r.width,
                r.height
            );
        }
        _ => {
            let (word, why) = match kind {
                Shown::Failed => (
                    "failed",
                    r.error
                        .clone()
                        .unwrap_or_else(|| "generation failed".into()),
                ),
                _ => (
                    "dropped",
                    if flagged {
                        "flagged by the safety checker (action: drop)".to_string()
                    } else {
                        "no image file".to_string()
                    },
                ),
            };
            let _ = write!(
                out,
                "<div class=\"placeholder\"><b>{word}</b><span>{}</span></div>",
                escape_html(&why)
            );
        }
    }
    out.push_str("<figcaption>");
    let _ = write!(
        out,
        "<div class=\"prompt\">{}</div>",
        escape_html(&r.prompt)
    );
    if !r.negative_prompt.is_empty() {
        let _ = write!(
            out,
            "<div class=\"neg\">Negative: {}</div>",
            escape_html(&r.negative_prompt)
        );
    }
    let (status_class, status_word) = match (r.status, kind) {
        (ImageStatus::Failed, _) => ("failed", "failed".to_string()),
        (_, Shown::Dropped) => ("flagged", "dropped".to_string()),
        (ImageStatus::Flagged, _) => ("flagged", "flagged".to_string()),
        (ImageStatus::Ok, _) if flagged => ("flagged", "flagged".to_string()),
        (ImageStatus::Ok, _) => ("ok", "ok".to_string()),
    };
    let safety = if r.status == ImageStatus::Failed {
        "n/a".to_string()
    } else if !r.safety.checked {
        "not checked".to_string()
    } else if flagged {
        match &r.safety.action {
            Some(a) => format!("FLAGGED ({a})"),
            None => "FLAGGED".to_string(),
        }
    } else {
        "passed".to_string()
    };
    let _ = write!(
        out,
        "<span class=\"badge {status_class}\">{}</span>",
        escape_html(&status_word)
    );
    out.push_str("<dl>");
    let mut row = |k: &str, v: String| {
        let _ = write!(
            out,
            "<dt>{}</dt><dd>{}</dd>",
            escape_html(k),
            escape_html(&v)
        );
    };
    row("job", r.job.clone());
    row("seed", r.seed.to_string());
    row("steps", r.steps.to_string());
    row("guidance", fmt_num(r.guidance));
    row("scheduler", r.scheduler.clone());
    row("size", format!("{}x{}", r.width, r.height));
    row("model", r.model.clone());
    if let Some(refiner) = &r.refiner {
        row(
            "refiner",
            format!("{} @ {}", refiner.model, fmt_num(refiner.switch_at)),
        );
    }
    for (k, v) in &r.grid {
        if !["steps", "guidance", "scheduler", "seed", "size", "model"].contains(&k.as_str()) {
            row(k, v.clone());
        }
    }
    row("safety", safety);
    if r.status == ImageStatus::Failed {
        if let Some(e) = &r.error {
            row("error", e.clone());
        }
    }
    out.push_str("</dl></figcaption></figure>\n");
}

/// Builds `report.html` for an output root: `records` are the manifest's records (paths
/// relative to the root), `sheets` the (job, relative path) of each job's contact sheet.
/// All user text is HTML-escaped; quarantined images are counted and listed by key but never
/// linked; dropped and failed ones appear as placeholders.
pub fn report_html(records: &[ManifestRecord], sheets: &[(String, String)]) -> String {
    let total = records.len();
    let flagged = records.iter().filter(|r| r.safety.flagged).count();
    let failed = records
        .iter()
        .filter(|r| r.status == ImageStatus::Failed)
        .count();
    let quarantined: Vec<&ManifestRecord> = records
        .iter()
        .filter(|r| shown(r) == Shown::Quarantined)
        .collect();
    let dropped = records
        .iter()
        .filter(|r| shown(r) == Shown::Dropped)
        .count();
    let jobs: BTreeSet<&str> = records
        .iter()
        .map(|r| r.job.as_str())
        .chain(sheets.iter().map(|(j, _)| j.as_str()))
        .collect();

    let mut out = String::new();
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str("<title>sd-run report</title>\n<style>");
    out.push_str(CSS);
    out.push_str(
        "</style>\n</head>\n<body>\n<header>\n<h1>sd-run report</h1>\n<div class=\"counts\">",
    );
    let _ = write!(
        out,
        "<span>images <b>{total}</b></span><span>shown <b id=\"shown\">{}</b></span>\
         <span class=\"flag\">flagged <b>{flagged}</b></span><span>failed <b>{failed}</b></span>\
         <span>dropped <b>{dropped}</b></span><span>quarantined <b>{}</b></span>",
        total - quarantined.len(),
        quarantined.len()
    );
    out.push_str("</div>\n<div class=\"controls\"><select id=\"job\" aria-label=\"job\"><option value=\"\">all jobs</option>");
    for job in &jobs {
        let j = escape_html(job);
        let _ = write!(out, "<option value=\"{j}\">{j}</option>");
    }
    out.push_str("</select><input id=\"q\" type=\"search\" placeholder=\"filter: prompt, seed, scheduler…\" aria-label=\"filter\"></div>\n</header>\n<main>\n");

    out.push_str("<h2>Images</h2>\n<section class=\"gallery\">\n");
    let mut any = false;
    for r in records {
        let kind = shown(r);
        if kind == Shown::Quarantined {
            continue;
        }
        any = true;
        card(&mut out, r, kind);
    }
    if !any {
        out.push_str("<p class=\"empty\">No images.</p>\n");
    }
    out.push_str("</section>\n");

    if !sheets.is_empty() {
        out.push_str("<h2>Contact sheets</h2>\n<section class=\"sheets\">\n");
        for (job, path) in sheets {
            let src = escape_html(&url_path(path));
            let j = escape_html(job);
            let _ = writeln!(
                out,
                "<figure data-job=\"{j}\"><figcaption><b>{j}</b></figcaption><a href=\"{src}\"><img src=\"{src}\" loading=\"lazy\" alt=\"contact sheet of {j}\"></a></figure>"
            );
        }
        out.push_str("</section>\n");
    }

    if !quarantined.is_empty() {
        out.push_str("<h2>Quarantined</h2>\n<section class=\"quarantine\"><p>Flagged by the safety checker and kept out of this page; their files are in the quarantine folder.</p><ul>\n");
        for r in &quarantined {
            let _ = writeln!(
                out,
                "<li data-job=\"{}\"><code>{}</code> job {} seed {}</li>",
                escape_html(&r.job),
                escape_html(&r.key),
                escape_html(&r.job),
                r.seed
            );
        }
        out.push_str("</ul></section>\n");
    }
    out.push_str("</main>\n<script>");
    out.push_str(JS);
    out.push_str("</script>\n</body>\n</html>\n");
    out
}
