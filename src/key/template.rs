//! Key templates (`person:{id}`, `persons:list:v{version}:{query_hash}`),
//! the path params they name, and how a param's value is written into a
//! key so that no two values meet.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::{hex_digest, hex_val, Canonical};
use crate::error::ConfigError;

/// Encoded path parameters longer than this are replaced by their hash, so
/// that key length stays bounded whatever the request carries.
const MAX_ENCODED_PARAM: usize = 128;

/// One piece of a parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(String),
    Param(String),
    QueryHash,
    Version,
}

/// A parsed key template such as `person:{id}` or
/// `persons:list:v{version}:{query_hash}`.
#[derive(Debug, Clone)]
pub(crate) struct KeyTemplate {
    source: String,
    segments: Vec<Segment>,
    /// The canonical form of each typed param the template names.
    types: Vec<(String, Canonical)>,
    /// Characters [`encode_param`] would keep that the template uses to
    /// separate its params: values escape them too, so no value can
    /// contain a separator (`repo:{o}-{r}` keys `a-b`/`c` and `a`/`b-c`
    /// apart).
    escape: Vec<u8>,
}

impl KeyTemplate {
    /// Parses `template`, checking every `{name}` against `params` (the
    /// parameters the route pattern binds). `allow_special` admits
    /// `{query_hash}` and `{version}`.
    pub(crate) fn parse(
        template: &str,
        params: &[String],
        allow_special: bool,
    ) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::InvalidKeyTemplate {
            template: template.to_owned(),
            reason: reason.to_owned(),
        };
        if template.is_empty() {
            return Err(bad("template is empty"));
        }
        let mut segments = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(bad("unmatched `}`"));
            }
            if open > 0 {
                segments.push(Segment::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| bad("unclosed `{`"))?;
            let name = &after[..close];
            if name.contains('{') {
                return Err(bad("nested `{`"));
            }
            let segment = match name {
                "query_hash" if allow_special => Segment::QueryHash,
                "version" if allow_special => Segment::Version,
                _ if params.iter().any(|p| p == name) => Segment::Param(name.to_owned()),
                _ => {
                    return Err(ConfigError::UnknownParam {
                        template: template.to_owned(),
                        param: name.to_owned(),
                    })
                }
            };
            segments.push(segment);
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        if segments.iter().filter(|s| **s == Segment::Version).count() > 1 {
            return Err(bad("`{version}` may appear once"));
        }
        let escape = separators(&segments).map_err(|reason| bad(&reason))?;
        Ok(Self {
            source: template.to_owned(),
            segments,
            types: Vec::new(),
            escape,
        })
    }

    /// The same template, rendering the params named in `types` in their
    /// canonical form.
    pub(crate) fn typed(mut self, types: &[(String, Canonical)]) -> Self {
        self.types = types
            .iter()
            .filter(|(name, _)| self.params().any(|p| p == name))
            .cloned()
            .collect();
        self
    }

    pub(crate) fn has(&self, segment: &Segment) -> bool {
        self.segments.contains(segment)
    }

    /// The path params the template names.
    pub(crate) fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The template as written.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Renders the template: params percent-decoded (and canonical, when
    /// typed), `{query_hash}` as given; a template with `{version}` splits
    /// there, returning the text before and after it. `None` when a typed
    /// param does not parse.
    pub(crate) fn render(&self, params: &Params<'_>, query_hash: &str) -> Option<Rendered> {
        let mut before = String::with_capacity(self.source.len() + 32);
        let mut after: Option<String> = None;
        for segment in &self.segments {
            let out = after.as_mut().unwrap_or(&mut before);
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Param(name) => {
                    let decoded = percent_decode(params.get(name).unwrap_or(""));
                    match self.types.iter().find(|(typed, _)| typed == name) {
                        Some((_, canonical)) => {
                            encode_param_escaping(&canonical.apply(&decoded)?, &self.escape, out)
                        }
                        None => encode_param_escaping(&decoded, &self.escape, out),
                    }
                }
                Segment::QueryHash => out.push_str(query_hash),
                Segment::Version => after = Some(String::new()),
            }
        }
        Some(match after {
            Some(after) => Rendered::Split(before, after),
            None => Rendered::Whole(before),
        })
    }
}

/// The characters a template separates its values with that values must
/// escape; an error when two values have no separator between them that a
/// value cannot contain (`{a}{b}`, `{a}x{b}`: `ab`/`c` and `a`/`bc` would
/// render alike).
fn separators(segments: &[Segment]) -> Result<Vec<u8>, String> {
    // An encoded value holds only these: letters, digits, `._-`, `%XX`
    // escapes and the `~` of a hashed long value.
    let kept = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    let in_values = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'~');
    let mut escape = Vec::new();
    let mut previous: Option<&Segment> = None;
    let mut between: Vec<u8> = Vec::new();
    for segment in segments {
        match segment {
            Segment::Literal(text) => {
                if previous.is_some() {
                    between.extend_from_slice(text.as_bytes());
                }
            }
            variable => {
                if let Some(previous) = previous {
                    if between.iter().all(|&b| in_values(b)) {
                        return Err(format!(
                            "{} and {} need a separator between them that no value holds, such as `:` or `-` (letters and digits are not)",
                            segment_name(previous),
                            segment_name(variable)
                        ));
                    }
                    for &b in &between {
                        if kept(b) && !in_values(b) && !escape.contains(&b) {
                            escape.push(b);
                        }
                    }
                }
                previous = Some(variable);
                between.clear();
            }
        }
    }
    Ok(escape)
}

fn segment_name(segment: &Segment) -> String {
    match segment {
        Segment::Param(name) => format!("`{{{name}}}`"),
        Segment::QueryHash => "`{query_hash}`".to_owned(),
        Segment::Version => "`{version}`".to_owned(),
        Segment::Literal(text) => format!("`{text}`"),
    }
}

/// A rendered template.
pub(crate) enum Rendered {
    Whole(String),
    Split(String, String),
}

/// Path parameters bound by a route pattern, as raw (still percent-encoded)
/// strings borrowed from the request path. Keys use them decoded, as axum's
/// `Path` extractor hands them to the handler.
#[derive(Debug, Default)]
pub(crate) struct Params<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Params<'a> {
    pub(crate) fn from_matchit(params: &matchit::Params<'a, 'a>) -> Self {
        Self(params.iter().collect())
    }

    pub(crate) fn get(&self, name: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
}

/// Names bound by a matchit route pattern: `/persons/{id}/x/{*rest}` gives
/// `id` and `rest`.
pub(crate) fn pattern_params(pattern: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        if let Some(escaped) = after.strip_prefix('{') {
            // `{{` is an escaped brace in matchit.
            rest = escaped;
            continue;
        }
        let Some(close) = after.find('}') else { break };
        names.push(after[..close].trim_start_matches('*').to_owned());
        rest = &after[close + 1..];
    }
    names
}

/// Decodes `%XX` escapes in a path segment, as axum's `Path` does (`+` stays
/// a `+` in a path). Malformed escapes are kept as written.
pub(crate) fn percent_decode(text: &str) -> std::borrow::Cow<'_, [u8]> {
    if !text.contains('%') {
        return std::borrow::Cow::Borrowed(text.as_bytes());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => match (hex_val(hi), hex_val(lo)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// Writes `raw` so that distinct inputs give distinct outputs and the output
/// holds no separator: everything but `[A-Za-z0-9._-]` is percent-encoded
/// (including `%` itself, `:`, `*`, `~`). Long values become `~` followed by
/// their hash; `~` never appears otherwise, so the two forms cannot meet.
#[cfg(test)]
pub(crate) fn encode_param(raw: &[u8], out: &mut String) {
    encode_param_escaping(raw, &[], out)
}

/// [`encode_param`], escaping the bytes of `escape` too (the template's
/// separators).
fn encode_param_escaping(raw: &[u8], escape: &[u8], out: &mut String) {
    let unreserved = |b: u8| {
        (b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) && !escape.contains(&b)
    };
    let encoded_len: usize = raw.iter().map(|&b| if unreserved(b) { 1 } else { 3 }).sum();
    if encoded_len > MAX_ENCODED_PARAM {
        out.push('~');
        out.push_str(&hex_digest(Sha256::digest(raw).as_slice()));
        return;
    }
    for &b in raw {
        if unreserved(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}
