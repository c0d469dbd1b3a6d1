//! What a Dockerfile needs from registries: the images its `FROM`,
//! `COPY --from=` and `RUN --mount=...,from=` name (stage names, stage
//! numbers and `scratch` excluded), after `ARG` substitution.
//!
//! The worker pulls these on the host (with the import's credentials, from
//! registries only the host may reach) and loads them into the builder VM
//! before the build, so buildah inside never pulls. This is a scanner of
//! the instructions that name images, not a Dockerfile interpreter: the
//! build itself is buildah's, in the VM.
//!
//! Substitution: `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`
//! from the build args and the `ARG` defaults (global args before the first
//! `FROM` apply to `FROM` lines; a stage's own args also to its
//! `--from=`).

use std::collections::{BTreeMap, BTreeSet};

/// Most distinct images one Dockerfile may name.
pub const MAX_IMAGES: usize = 16;

/// The images `text` names, in order of first use. Errors are user-safe.
pub fn base_images(
    text: &str,
    build_args: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut global: BTreeMap<String, String> = BTreeMap::new();
    let mut stage_args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: BTreeSet<String> = BTreeSet::new();
    let mut seen_from = false;
    let mut images: Vec<String> = Vec::new();
    let mut add = |image: String, line: usize| -> Result<(), String> {
        if image.is_empty() {
            return Err(format!(
                "Dockerfile line {line}: the image name is empty (an ARG without a value?)"
            ));
        }
        if !images.contains(&image) {
            if images.len() >= MAX_IMAGES {
                return Err(format!(
                    "the Dockerfile names more than {MAX_IMAGES} images"
                ));
            }
            images.push(image);
        }
        Ok(())
    };
    for (line, instr) in instructions(text) {
        let (word, rest) = split_word(&instr);
        match word.to_ascii_uppercase().as_str() {
            "ARG" => {
                for decl in rest.split_whitespace() {
                    let mut vars = global.clone();
                    vars.extend(stage_args.clone());
                    let (name, default) = match decl.split_once('=') {
                        Some((n, d)) => (n, Some(substitute(&unquote(d), &vars))),
                        None => (decl, None),
                    };
                    let value = build_args
                        .get(name)
                        .cloned()
                        .or(default)
                        .or_else(|| global.get(name).cloned())
                        .unwrap_or_default();
                    if seen_from {
                        stage_args.insert(name.to_owned(), value);
                    } else {
                        global.insert(name.to_owned(), value);
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                stage_args.clear();
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let Some(image) = words.first() else {
                    return Err(format!("Dockerfile line {line}: FROM without an image"));
                };
                let image = substitute(image, &global);
                if !stages.contains(&image.to_ascii_lowercase())
                    && !image.eq_ignore_ascii_case("scratch")
                {
                    add(image, line)?;
                }
                if let [_, as_kw, name] = words.as_slice() {
                    if as_kw.eq_ignore_ascii_case("as") {
                        stages.insert(name.to_ascii_lowercase());
                    }
                }
            }
            "COPY" | "ADD" | "RUN" => {
                let mut vars = global.clone();
                vars.extend(stage_args.clone());
                for flag in rest.split_whitespace().take_while(|w| w.starts_with("--")) {
                    let from = if let Some(v) = flag.strip_prefix("--from=") {
                        Some(v.to_owned())
                    } else if let Some(m) = flag.strip_prefix("--mount=") {
                        m.split(',')
                            .find_map(|kv| kv.strip_prefix("from="))
                            .map(str::to_owned)
                    } else {
                        None
                    };
                    let Some(from) = from else { continue };
                    let from = substitute(&unquote(&from), &vars);
                    let is_index = !from.is_empty() && from.bytes().all(|b| b.is_ascii_digit());
                    if !is_index
                        && !stages.contains(&from.to_ascii_lowercase())
                        && !from.eq_ignore_ascii_case("scratch")
                    {
                        add(from, line)?;
                    }
                }
            }
            _ => {}
        }
    }
    if !seen_from {
        return Err("the Dockerfile has no FROM instruction".into());
    }
    Ok(images)
}

/// Logical instructions with their first line number: comments and empty
/// lines dropped, `\` continuations joined, heredoc bodies skipped.
fn instructions(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut heredoc: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(end) = &heredoc {
            if raw.trim() == end {
                heredoc = None;
            }
            continue;
        }
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (body, cont) = match trimmed.strip_suffix('\\') {
            Some(b) => (b, true),
            None => (trimmed, false),
        };
        let entry = current.get_or_insert_with(|| (n, String::new()));
        if !entry.1.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body.trim());
        if !cont {
            if let Some(pos) = entry.1.find("<<") {
                let marker = entry.1[pos + 2..]
                    .trim_start_matches('-')
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches(|c| c == '"' || c == '\'')
                    .to_owned();
                if !marker.is_empty()
                    && marker
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    heredoc = Some(marker);
                }
            }
            out.extend(current.take());
        }
    }
    out.extend(current);
    out
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.to_owned();
        }
    }
    s.to_owned()
}

/// `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`.
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    let name_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        if b[i] != b'$' {
            let start = i;
            while i < b.len() && b[i] != b'$' {
                i += 1;
            }
            out.push_str(&s[start..i]);
            continue;
        }
        if i + 1 < b.len() && b[i + 1] == b'{' {
            if let Some(close) = s[i + 2..].find('}') {
                let inner = &s[i + 2..i + 2 + close];
                let (name, default) = if let Some((n, d)) = inner.split_once(":-") {
                    (n, Some(d))
                } else if let Some((n, d)) = inner.split_once('-') {
                    (n, Some(d))
                } else {
                    (inner, None)
                };
                let value = vars
                    .get(name)
                    .filter(|v| !v.is_empty() || default.is_none());
                match (value, default) {
                    (Some(v), _) => out.push_str(v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {}
                }
                i += 2 + close + 1;
                continue;
            }
        }
        let start = i + 1;
        let mut j = start;
        while j < b.len() && name_char(b[j]) {
            j += 1;
        }
        if j == start {
            out.push('$');
            i += 1;
            continue;
        }
        if let Some(v) = vars.get(&s[start..j]) {
            out.push_str(v);
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(text: &str, args: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let args = args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        base_images(text, &args)
    }

    #[test]
    fn stages_and_scratch_are_not_images() {
        let df = "# syntax=docker/dockerfile:1\nFROM busybox:1 AS build\nRUN echo hi\n\
                  FROM scratch\nCOPY --from=build /x /x\nCOPY --from=0 /y /y\n\
                  COPY --from=alpine:3 /bin/sh /sh\nFROM build\n";
        assert_eq!(
            images(df, &[]).unwrap_or_default(),
            ["busybox:1", "alpine:3"]
        );
    }

    #[test]
    fn args_substitute_with_defaults_and_build_args() {
        let df = "ARG REG=127.0.0.1:5000\nARG TAG\nFROM ${REG}/base:${TAG:-1} AS a\n\
                  FROM $REG/other:2\nARG SRC=${REG}/tools:3\nCOPY --from=$SRC /t /t\n";
        assert_eq!(
            images(df, &[]).unwrap_or_default(),
            [
                "127.0.0.1:5000/base:1",
                "127.0.0.1:5000/other:2",
                "127.0.0.1:5000/tools:3"
            ]
        );
        assert_eq!(
            images(df, &[("REG", "r.example:1"), ("TAG", "9")]).unwrap_or_default()[0],
            "r.example:1/base:9"
        );
    }

    #[test]
    fn continuations_comments_flags_and_heredocs() {
        let df = "FROM --platform=linux/amd64 \\\n  debian:12 \\\n  AS one\n# FROM evil:1\n\
                  RUN <<EOF\nFROM not-an-image\nEOF\n\
                  RUN --mount=type=bind,from=tools:1,target=/t true\n";
        assert_eq!(
            images(df, &[]).unwrap_or_default(),
            ["debian:12", "tools:1"]
        );
    }

    #[test]
    fn bad_dockerfiles_get_clear_errors() {
        assert!(images("RUN true\n", &[])
            .err()
            .unwrap_or_default()
            .contains("no FROM"));
        assert!(images("ARG B\nFROM $B\n", &[])
            .err()
            .unwrap_or_default()
            .contains("line 2"));
        let many: String = (0..20).map(|i| format!("FROM img{i}\n")).collect();
        assert!(images(&many, &[])
            .err()
            .unwrap_or_default()
            .contains("more than 16"));
    }
}
