//! Diagnostics: every problem of a spec (or `sd-run.toml`), each with its position.

use std::fmt;

/// One problem, at a 1-based line and column of `file` (as the user named it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found, in file order; displays as one `FILE:LINE:COL: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<Diagnostic>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl SpecErrors {
    /// A single diagnostic.
    pub fn one(file: &str, line: usize, col: usize, message: impl Into<String>) -> Self {
        SpecErrors(vec![Diagnostic {
            file: file.to_string(),
            line,
            col,
            message: message.into(),
        }])
    }

    /// The messages alone (without positions), in order.
    pub fn messages(&self) -> Vec<&str> {
        self.0.iter().map(|d| d.message.as_str()).collect()
    }
}

/// 1-based (line, column) of a byte offset in `text` (columns count characters).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let mut off = offset;
    while off > 0 && !text.is_char_boundary(off) {
        off -= 1;
    }
    let before = &text[..off];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}
