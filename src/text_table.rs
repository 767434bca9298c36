//! Plain-text tables for the command-line reports: each column padded to its widest cell
//! (counted in characters, so names and reasons outside ASCII stay aligned), `gap` spaces
//! between columns, no trailing spaces.
//!
//! Cells are text others wrote (a vote's reason, a condition's message, a name): each is shown
//! on its one line with what a terminal would act on escaped ([`terminal_text::line`]), so a line
//! break cannot forge a row nor an escape sequence erase one
//! (`review::table::tests::a_vote_reason_cannot_forge_rows_or_move_the_cursor`).

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::domain::terminal_text;

pub fn render<R: AsRef<[String]>>(header: &[&str], rows: &[R], gap: usize) -> String {
    let rows: Vec<Vec<Cow<str>>> = rows.iter().map(|r| r.as_ref().iter().map(|c| terminal_text::line(c)).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let separator = " ".repeat(gap);
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", padded.join(&separator).trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(|c| c.as_ref()).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_on_characters_not_bytes() {
        let rows = vec![vec!["é-vote".to_string(), "1".to_string()], vec!["b".to_string(), "22".to_string()]];
        assert_eq!(super::render(&["NAME", "N"], &rows, 2), "NAME    N\né-vote  1\nb       22\n");
    }
}
