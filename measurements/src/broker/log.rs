//! The broker's own log of refusals: one line per refused request naming the node (session,
//! peer address, the evidence's identifying values), the check and what was expected and
//! found, so that an operator sees why a node is stuck. Everything in it may come from the
//! node or the network, so every value is escaped: no control character (newline, escape
//! sequence) reaches the operator's terminal or log collector raw.

use std::fmt::Write;
use std::sync::Arc;

/// Where log lines go (stderr in `kbs-serve`; a capture in tests).
pub type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// The default sink: one line on stderr.
pub fn stderr() -> Sink {
    Arc::new(|line: &str| eprintln!("{line}"))
}

/// `text` with every character that could break the line or hide text written as an escape
/// (`cvm_formats::text::escape`), so that the result is one printable line.
pub fn escape(text: &str) -> String {
    cvm_formats::text::escape(text).into_owned()
}

/// One refusal as a line: `kbs-serve: refused <field>="<escaped value>" ...`.
pub fn refusal_line(fields: &[(&str, &str)]) -> String {
    let mut line = String::from("kbs-serve: refused");
    push_fields(&mut line, fields);
    line
}

/// One grant as a line: `kbs-serve: <what> a node matching reference="B.json" <fields>`,
/// `what` being the broker's own words (`attested`, `released resource="a/b/c" to`).
pub fn grant_line(what: &str, reference: &str, fields: &[(&str, &str)]) -> String {
    let mut line = format!("kbs-serve: {} a node matching", escape(what));
    push_fields(&mut line, &[("reference", reference)]);
    push_fields(&mut line, fields);
    line
}

fn push_fields(line: &mut String, fields: &[(&str, &str)]) {
    for (name, value) in fields {
        let _ = write!(line, " {name}=\"{}\"", escape(value).replace('"', "\\\""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("a\nb\x1b[2Jc\\d\u{85}"), "a\\nb\\x1b[2Jc\\\\d\\x85");
        assert_eq!(
            refusal_line(&[("peer", "1.2.3.4:5"), ("reason", "x\"\ncvm-init: ready")]),
            "kbs-serve: refused peer=\"1.2.3.4:5\" reason=\"x\\\"\\ncvm-init: ready\""
        );
    }

    proptest! {
        #[test]
        fn any_text_gives_one_printable_line(text in any::<String>()) {
            let line = refusal_line(&[("reason", &text)]);
            prop_assert!(!line.chars().any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'), "{line:?}");
        }
    }
}
