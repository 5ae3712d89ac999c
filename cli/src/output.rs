//! Rendering results for humans (tables) or scripts (`--json`).
//!
//! Text a guest wrote (process names, file names, console lines, error messages that quote guest output)
//! is hostile: raw, an escape sequence could write the user's clipboard (OSC 52), retitle or redraw the
//! terminal, and bidi overrides could make a name read as another. Every table cell and every guest string
//! printed for a human goes through `term_safe` (or `term_line` for log streams); `--json` prints exact
//! values, whose JSON escaping already makes every control character inert.
use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Serialize;
use unicode_width::UnicodeWidthChar;

/// Widest table cell, in terminal columns; longer cells end in `…`.
pub const MAX_CELL_WIDTH: usize = 120;

/// `text` with every character a terminal would act on made visible: C0 controls (newline and tab included),
/// DEL, C1 controls and the bidi embedding, override and isolate marks become `\xNN` / `\u{NNNN}`.
pub fn term_safe(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// Like `term_safe`, for one line of a log stream: tabs stay (a newline cannot occur within a line).
pub fn term_line(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// Like `term_line`, for text of several lines (an error and its hint): each line escaped, newlines kept.
pub fn term_lines(text: &str) -> String {
    text.lines().map(|l| term_line(l).into_owned()).collect::<Vec<_>>().join("\n")
}

fn is_unsafe(c: char, keep_tab: bool) -> bool {
    match c {
        '\t' => !keep_tab,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        // Bidi embeddings/overrides, isolates, and the implicit marks that can flip what follows.
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}' => true,
        _ => false,
    }
}

fn escape(text: &str, keep_tab: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_unsafe(c, keep_tab)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !is_unsafe(c, keep_tab) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// Columns `text` takes on a terminal (wide characters count two, combining marks none).
fn display_width(text: &str) -> usize {
    text.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// A table cell: made safe, then cut at a character boundary to at most `MAX_CELL_WIDTH` columns.
pub fn cell(text: &str) -> String {
    let safe = term_safe(text);
    if display_width(&safe) <= MAX_CELL_WIDTH {
        return safe.into_owned();
    }
    let mut out = String::new();
    let mut width = 0;
    for c in safe.chars() {
        let w = c.width().unwrap_or(0);
        if width + w > MAX_CELL_WIDTH - 1 {
            break;
        }
        width += w;
        out.push(c);
    }
    out.push('…');
    out
}

/// Prints `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("results always serialise"));
}

/// Prints rows under a header, columns padded to the widest cell. Every cell goes through `cell`, so a
/// guest-chosen value can neither reach the terminal raw nor stretch the table without bound.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(header, rows));
}

fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| cell(h)).collect()];
    cells.extend(rows.iter().map(|r| {
        let mut r: Vec<String> = r.iter().take(columns).map(|c| cell(c)).collect();
        r.resize(columns, String::new());
        r
    }));
    let mut widths = vec![0usize; columns];
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(display_width(c));
        }
    }
    let mut out = String::new();
    for r in &cells {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                // Padded by display width: `{:<w$}` counts chars, which misaligns wide characters.
                line.extend(std::iter::repeat_n(' ', widths[i] - display_width(c) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn ago(epoch: i64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let d = (now - epoch).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_escapes_and_bidi_marks_are_made_visible() {
        let osc52 = "ok\u{1b}]52;c;aGVsbG8=\u{7}tail";
        assert_eq!(term_safe(osc52), "ok\\x1b]52;c;aGVsbG8=\\x07tail");
        assert_eq!(term_safe("a\u{9b}31mb\u{7f}"), "a\\x9b31mb\\x7f", "C1 CSI and DEL");
        assert_eq!(term_safe("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(term_safe("line\nbreak\r"), "line\\x0abreak\\x0d");
        assert_eq!(term_line("col1\tcol2\u{1b}[2J"), "col1\tcol2\\x1b[2J");
        assert!(matches!(term_safe("plain ünïcode 名前"), Cow::Borrowed(_)));
        // An error and its hint stay two lines; what is in them is escaped.
        assert_eq!(term_lines("failed \u{1b}]52;x\n  hint: retry\r"), "failed \\x1b]52;x\n  hint: retry\\x0d");
    }

    #[test]
    fn long_and_wide_cells_are_cut_by_display_width_at_char_boundaries() {
        let long = "é".repeat(100_000);
        let c = cell(&long);
        assert_eq!(display_width(&c), MAX_CELL_WIDTH);
        assert!(c.ends_with('…'));
        let wide = "名".repeat(500);
        let c = cell(&wide);
        assert!(display_width(&c) <= MAX_CELL_WIDTH, "{}", display_width(&c));
        let table = render_table(&["A", "B"], &[vec![long.clone(), "x".into()], vec!["名前".into(), "y".into()]]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        // The second column starts at the same display column on every row.
        let col = |l: &str, v: char| display_width(&l[..l.find(v).unwrap()]);
        assert_eq!(col(lines[1], 'x'), col(lines[2], 'y'));
        assert!(!table.contains('\u{1b}'));
    }

    #[test]
    fn a_short_row_does_not_panic() {
        let t = render_table(&["A", "B", "C"], &[vec!["only".into()]]);
        assert_eq!(t.lines().nth(1), Some("only"));
    }
}
