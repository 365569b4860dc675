//! Text that may come from the host, made safe to print: every character that could start a
//! line of its own, move the cursor or reorder what a reader sees is written as a visible
//! escape. The init's console and the key broker's refusal log share it.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether a character must not reach the console as itself: C0 and C1 controls and DEL
/// (newlines, carriage returns, escape sequences — C1's CSI included), the Unicode line and
/// paragraph separators, and the bidirectional controls that reorder what a reader sees.
pub fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\\' | '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// The text with every character of [`must_escape`] written as a visible escape (`\n`,
/// `\x1b`, `\u{202e}`; a backslash as `\\`, so the escaping is unambiguous).
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(must_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if must_escape(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if must_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_separators_and_bidi_overrides_are_visible() {
        assert_eq!(
            escape("a\nb\x1b[2Jc\\d\u{85}\u{2028}\u{202e}"),
            "a\\nb\\x1b[2Jc\\\\d\\x85\\u{2028}\\u{202e}"
        );
        assert!(matches!(escape("plain text"), Cow::Borrowed(_)));
    }
}
