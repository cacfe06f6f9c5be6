//! `duet.toml(5)`, made from the commented example configuration (`duet.example.toml`, the
//! contract): each section a heading, each key with its default value and what its comment
//! says (units are in the key names). `duet generate man DIR` writes it beside the command pages.

/// The example the page is made from.
pub const EXAMPLE: &str = include_str!("../../duet.example.toml");

/// Text safe in a roff line: backslashes escaped, a leading `.` or `'` made literal.
fn roff(s: &str) -> String {
    let t = s.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') { format!("\\&{t}") } else { t }
}

/// A key line: `key = value   # comment` (the `#` of the comment outside any string).
fn key_line(line: &str) -> Option<(&str, &str, &str)> {
    let (key, rest) = line.split_once(" = ")?;
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let mut in_str = false;
    for (i, c) in rest.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return Some((key, rest[..i].trim(), rest[i + 1..].trim())),
            _ => {}
        }
    }
    Some((key, rest.trim(), ""))
}

/// The page, in roff (man(7)).
pub fn config_page(example: &str, version: &str) -> String {
    let mut o = String::new();
    o.push_str(&format!(".TH DUET.TOML 5 \"\" \"duet {}\" \"File Formats\"\n", roff(version)));
    o.push_str(".SH NAME\nduet.toml \\- configuration of the duet replicated block store\n");
    o.push_str(".SH SYNOPSIS\n/etc/duet/duet.toml\n.SH DESCRIPTION\n");
    o.push_str(
        "One TOML file, the same on both nodes, read by \\fBduet\\fR(1) at start and by \\fBduet adjust\\fR. \
Unknown keys are an error, and every error names the key, the bad value and the fix. \
Below, each key is shown with its default (or an example value) and what it means; \
units are in the key names (\\fB_ms\\fR, \\fB_kib\\fR).\n",
    );
    let mut lines = example.lines().peekable();
    // The file's own opening comment is the description above: skip to the first table.
    while lines.peek().is_some_and(|l| !l.trim_start().starts_with('[')) {
        lines.next();
    }
    let mut open_item = false;
    let mut in_para = false;
    for line in lines {
        let t = line.trim();
        let was_para = std::mem::take(&mut in_para);
        if t.is_empty() {
            open_item = false;
            continue;
        }
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']');
            let heading =
                if t.starts_with("[[") { format!("[[{name}]]") } else { format!("[{name}]") };
            let level = if name.contains('.') { ".SS" } else { ".SH" };
            o.push_str(&format!("{level} \"{}\"\n", roff(&heading)));
            open_item = false;
            continue;
        }
        if let Some(c) = t.strip_prefix('#') {
            let c = c.trim();
            if c.chars().all(|ch| ch == '-' || ch == ' ') {
                continue;
            }
            // An indented comment continues the key above; one at the margin is a paragraph.
            if open_item && line.starts_with(' ') {
                o.push_str(&format!("{}\n", roff(c)));
            } else {
                // Section rules (`# ---- hooks`) name what follows; lines in a row are one
                // paragraph.
                let c = c.trim_start_matches('-').trim();
                if !was_para {
                    o.push_str(".PP\n");
                }
                o.push_str(&format!("{}\n", roff(c)));
                open_item = false;
                in_para = true;
            }
            continue;
        }
        if let Some((key, value, comment)) = key_line(t) {
            o.push_str(&format!(".TP\n\\fB{}\\fR = {}\n", roff(key), roff(value)));
            o.push_str(&format!(
                "{}\n",
                if comment.is_empty() { "(no comment)".into() } else { roff(comment) }
            ));
            open_item = true;
        }
    }
    o.push_str(
        ".SH SEE ALSO\n\\fBduet\\fR(1), \\fBduet\\-adjust\\fR(1), /usr/share/doc/duet/README.md\n",
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_example_is_on_the_page_with_its_comment() {
        let page = config_page(EXAMPLE, "0.1.0");
        let keys: Vec<&str> = EXAMPLE
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| key_line(l.trim()).map(|k| k.0))
            .collect();
        assert!(keys.len() > 60, "{} keys", keys.len());
        for k in keys {
            assert!(page.contains(&format!("\\fB{}\\fR = ", roff(k))), "{k} missing");
        }
        for want in [
            ".SH \"[cluster]\"",
            ".SS \"[resource.resync]\"",
            ".SH \"[hooks]\"",
            "\\fBrate_kib\\fR = ",
            "before a resync as target",
        ] {
            assert!(page.contains(want), "{want} missing:\n{page}");
        }
        assert!(
            !page.lines().any(|l| l.starts_with('.') && l.len() > 1 && l.as_bytes()[1] == b' ')
        );
    }

    #[test]
    fn roff_is_escaped_and_values_keep_their_quotes() {
        assert_eq!(roff(".x"), "\\&.x");
        assert_eq!(roff("a\\b"), "a\\eb");
        assert_eq!(
            key_line("mac = \"\"   # \"\" = keep # the MAC"),
            Some(("mac", "\"\"", "\"\" = keep # the MAC"))
        );
        assert_eq!(key_line("x = \"a#b\""), Some(("x", "\"a#b\"", "")));
        assert_eq!(key_line("# a = b"), None);
    }
}
