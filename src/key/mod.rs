//! Key templates, path-parameter encoding, query normalisation and scopes.
//!
//! Every function here is deterministic and injective where it matters: two
//! requests that differ in a path parameter, a relevant query parameter or a
//! scope value never render the same key.
//!
//! # What the key covers
//!
//! What each input a handler can read does to the cache (the README holds
//! the same table). Inputs marked "bound" are not in the key string: each
//! entry carries a digest of its key and of them ([`inputs::Binding`]),
//! checked on every hit.
//!
//! | input the handler can read | what the cache does |
//! | --- | --- |
//! | method | GET and HEAD only (HEAD served from the GET entry); other methods pass through |
//! | matched route (axum's `MatchedPath`, feature `axum`) | picks the route: a route the application served that the policy does not name passes through |
//! | path | matched against the route; path params keyed percent-decoded, and canonical when typed (`.param`); every param named by the template (or bound, `.unkeyed_param`); the template's separators escaped inside values |
//! | route and nest prefix (axum's `OriginalUri`) | bound |
//! | absolute-form URI | scheme bound; userinfo bypasses (`authorization`) |
//! | query | keyed normalised (decoded, sorted, empty values dropped unless `.keep_empty_query_values()`, only the allowlist when set); what the key drops is removed from the handler's request (or bypasses, `.bypass_dropped_query()`) |
//! | host (the URI's authority and the `Host` header) | bound into every entry (lower-cased, default port dropped; both when a request names two hosts, an absolute URI beside another `Host`); `.hosts([...])` bypasses other hosts; `Scope::host()` keys each host apart |
//! | `Forwarded` (`host`, `proto`), `X-Forwarded-Host`, `-Proto`, `-Prefix`, `-Port`, `-Server`, `-Scheme`, `-Ssl`, `-Uri`, `X-Host`, `X-Original-Host`, `X-Url-Scheme`, `Front-End-Https` | bound into the entry when present (constant in an honest deployment, so free; an attacker's value only reaches the attacker); `.trusted_header(name)` leaves out one your proxy always overwrites |
//! | `X-Original-URL`, `X-Rewrite-URL`, `X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override` | the request bypasses the cache (`rewrite`) |
//! | `X-Forwarded-For`, `X-Real-IP` | ignored: they differ per client. A handler whose body depends on them must not be cached |
//! | `Authorization`, `Cookie` | the request bypasses (`authorization`) unless the scope reads the header or an extension an auth layer derived from it, or the route is `.public()` |
//! | headers the route scopes by (`Scope::header`, `header_as`) | keyed (hashed), fail closed when absent; sent twice, the request bypasses (`scope-ambiguous`) |
//! | headers the route varies on (`.vary_by`) | bound into the entry as sent (`Accept-Encoding` as a set of codings) |
//! | any other header (`Origin`, `Referer`, `User-Agent`, custom ones) | not keyed. A response that depends on one must say so with `Vary`: a `Vary` on a header the route neither scopes nor varies on is not stored. For a custom header the handler reads without saying so, scope by it (`Scope::header`) or vary by it (`.vary_by`) |
//! | extensions (set by layers outside) | keyed when the scope reads them (`Scope::extension`) |
//! | body | a GET or HEAD whose body is not known empty (by the body itself, or `Content-Length` > 0, `Transfer-Encoding`) bypasses (`request-body`) |

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::error::ConfigError;
use crate::reason::Reason;

mod cache_key;
mod canonical;
mod inputs;
pub(crate) mod served;

pub use cache_key::{CacheKey, VersionKey};
pub use canonical::Canonical;
pub(crate) use inputs::{Binding, InputRules, BINDING_LEN};

/// Encoded path parameters longer than this are replaced by their hash, so
/// that key length stays bounded whatever the request carries.
const MAX_ENCODED_PARAM: usize = 128;

/// What separates a key from its scope hash: `app:person:42:scope=<hash>`.
pub(crate) const SCOPE_MARK: &str = ":scope=";

/// Hex characters kept from a SHA-256 digest (128 bits).
const HASH_HEX_LEN: usize = 32;

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

fn hex_digest(digest: &[u8]) -> String {
    let mut hex = String::with_capacity(HASH_HEX_LEN);
    for byte in digest.iter().take(HASH_HEX_LEN / 2) {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Feeds `bytes` to `hasher` with its length first, so that concatenations
/// of different splits never hash alike.
pub(crate) fn hash_field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

/// A decoded query pair: name, value.
pub(crate) type QueryPair = (Vec<u8>, Vec<u8>);

/// How a route turns its query string into `{query_hash}`, and what of it
/// reaches the handler.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueryRule {
    /// Only these parameters count; `None` means all of them.
    pub(crate) allowlist: Option<Vec<String>>,
    /// Empty values count too (`?name=` is not the same as no `name`).
    pub(crate) keep_empty: bool,
    /// A parameter the key drops makes the request bypass the cache,
    /// instead of being removed from the request the handler gets.
    pub(crate) bypass_dropped: bool,
}

impl QueryRule {
    /// Whether the key keeps the (decoded) pair.
    fn keeps(&self, name: &[u8], value: &[u8]) -> bool {
        (self.keep_empty || !value.is_empty())
            && match &self.allowlist {
                Some(allowed) => allowed.iter().any(|a| a.as_bytes() == name),
                None => true,
            }
    }

    /// The normalised query: decoded pairs, empty values dropped (unless
    /// kept), filtered by the allowlist, sorted by name (values of a
    /// repeated name keep their order, since an application may read them
    /// in order).
    #[cfg(test)]
    pub(crate) fn normalise(&self, query: Option<&str>) -> Vec<QueryPair> {
        self.read(query).0
    }

    /// The normalised query (see [`normalise`](Self::normalise)) and, when
    /// the key dropped some of its pairs, the query the handler gets: the
    /// pairs the key keeps, as written and in their order. One pass.
    pub(crate) fn read(&self, query: Option<&str>) -> (Vec<QueryPair>, Option<String>) {
        let Some(query) = query else {
            return (Vec::new(), None);
        };
        let mut pairs = Vec::new();
        let mut kept_raw: Vec<&str> = Vec::new();
        let mut dropped = false;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, value) = (form_decode(name), form_decode(value));
            if self.keeps(&name, &value) {
                pairs.push((name, value));
                kept_raw.push(pair);
            } else {
                dropped = true;
            }
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        (pairs, dropped.then(|| kept_raw.join("&")))
    }

    /// The query the handler gets when the key dropped parts of it.
    #[cfg(test)]
    pub(crate) fn stripped(&self, query: Option<&str>) -> Option<String> {
        self.read(query).1
    }

    /// SHA-256 of the normalised query, 32 hex characters.
    pub(crate) fn hash(pairs: &[(Vec<u8>, Vec<u8>)]) -> String {
        let mut hasher = Sha256::new();
        for (name, value) in pairs {
            hash_field(&mut hasher, name);
            hash_field(&mut hasher, value);
        }
        hex_digest(hasher.finalize().as_slice())
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a
/// byte). Malformed escapes are kept as written rather than rejected.
fn form_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Reads one scope value from a request.
type ExtensionFn = Arc<dyn Fn(&Extensions) -> Option<String> + Send + Sync>;

#[derive(Clone)]
enum ScopePart {
    /// A header, canonicalised when typed.
    Header(HeaderName, Option<Canonical>),
    /// The request's host, as [`inputs::host`] reads it.
    Host,
    /// The reader; clones of one scope share it and compare equal.
    Extension(ExtensionFn),
}

/// The request parts that scope a cache key: headers such as `Authorization`
/// or `X-Tenant-Id`, or values an auth layer put in the request extensions.
///
/// Scope values are hashed (SHA-256) into the key and never stored in clear.
///
/// # Fail closed
///
/// A request on which any part of the scope reads nothing (the header is
/// absent or empty, the extension returns `None` or an empty string)
/// bypasses the cache with reason `scope-missing`: it never shares an entry. This is what keeps a cache
/// layer placed *outside* the authentication layer from serving one
/// tenant's entry to another: the extension the auth layer sets is not
/// there yet, so nothing is served from the cache.
///
/// ```
/// use tower_redis_cache::Scope;
///
/// #[derive(Clone)]
/// struct TenantId(u64);
///
/// let scope = Scope::new()
///     .header("x-tenant-id")
///     .extension(|ext| ext.get::<TenantId>().map(|t| t.0.to_string()));
/// assert!(!scope.is_empty());
/// ```
#[derive(Clone, Default)]
pub struct Scope {
    parts: Vec<ScopePart>,
    invalid_header: Option<String>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| match p {
                ScopePart::Header(name, None) => format!("header {name}"),
                ScopePart::Header(name, Some(canonical)) => {
                    format!("header {name} as {canonical:?}")
                }
                ScopePart::Host => "host".to_owned(),
                ScopePart::Extension(_) => "extension".to_owned(),
            })
            .collect();
        f.debug_struct("Scope").field("parts", &parts).finish()
    }
}

impl Scope {
    /// An empty scope: the key depends on the path and query alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a request header to the scope.
    ///
    /// An invalid header name is reported as a [`ConfigError`] when the
    /// policy is built.
    pub fn header(self, name: &str) -> Self {
        self.push_header(name, None)
    }

    /// Adds a request header that the application reads in a canonical
    /// form (see [`Canonical`]): `X-Tenant-Id: ACME` and `acme` are one
    /// scope under [`Canonical::case_insensitive`]. A value that does not
    /// parse bypasses the cache, as an absent one does.
    pub fn header_as(self, name: &str, canonical: Canonical) -> Self {
        self.push_header(name, Some(canonical))
    }

    fn push_header(mut self, name: &str, canonical: Option<Canonical>) -> Self {
        match HeaderName::try_from(name) {
            Ok(name) => self.parts.push(ScopePart::Header(name, canonical)),
            Err(_) => self.invalid_header = Some(name.to_owned()),
        }
        self
    }

    /// Adds the request's host (the URI's authority, else `Host`;
    /// lower-cased, the default port dropped): for applications with a
    /// tenant per host name (`acme.example.com`). Entries are always bound
    /// to their host (one host never gets another's); scoping by it also
    /// keys each host apart, so several hosts reading one path keep an
    /// entry each, and a write purges its own host's entry.
    pub fn host(mut self) -> Self {
        self.parts.push(ScopePart::Host);
        self
    }

    /// Adds a value read from the request extensions, for example the tenant
    /// an authentication layer resolved.
    pub fn extension<F>(mut self, read: F) -> Self
    where
        F: Fn(&Extensions) -> Option<String> + Send + Sync + 'static,
    {
        self.parts.push(ScopePart::Extension(Arc::new(read)));
        self
    }

    /// True when the scope has no parts.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match &self.invalid_header {
            Some(name) => Err(ConfigError::InvalidHeaderName(name.clone())),
            None => Ok(()),
        }
    }

    /// Header names in the scope (a response that varies on these may be
    /// stored, since the key already separates them).
    pub(crate) fn covers_header(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, ScopePart::Header(h, _) if h.as_str().eq_ignore_ascii_case(name)))
    }

    /// Whether the credentials `headers` carry (`Authorization`, `Cookie`)
    /// are covered by the key: the scope reads the header itself, or a
    /// value an auth layer derived from it (an extension). A scope of hosts
    /// or other headers only covers none.
    pub(crate) fn covers_credentials(&self, headers: &HeaderMap) -> bool {
        let derived = self
            .parts
            .iter()
            .any(|p| matches!(p, ScopePart::Extension(_)));
        derived
            || [http::header::AUTHORIZATION, http::header::COOKIE]
                .iter()
                .all(|name| !headers.contains_key(name) || self.covers_header(name.as_str()))
    }

    /// True when both read the same request parts: the same headers, and
    /// the very same extension readers (clones of one `Scope`), in order.
    pub(crate) fn same_as(&self, other: &Scope) -> bool {
        self.parts.len() == other.parts.len()
            && self
                .parts
                .iter()
                .zip(&other.parts)
                .all(|(a, b)| match (a, b) {
                    (ScopePart::Header(a, None), ScopePart::Header(b, None)) => a == b,
                    (ScopePart::Header(a, Some(x)), ScopePart::Header(b, Some(y))) => {
                        a == b && x.same_as(y)
                    }
                    (ScopePart::Host, ScopePart::Host) => true,
                    (ScopePart::Extension(a), ScopePart::Extension(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                })
    }

    /// `:scope=<hash>` for a scoped key, nothing for an empty scope; the
    /// reason to bypass when a part reads nothing (fail closed) or a typed
    /// header's value does not parse.
    pub(crate) fn key_suffix<B>(&self, request: &http::Request<B>) -> Result<String, Reason> {
        if self.parts.is_empty() {
            return Ok(String::new());
        }
        let (headers, extensions) = (request.headers(), request.extensions());
        let mut hasher = Sha256::new();
        for part in &self.parts {
            let value: Option<Vec<u8>> = match part {
                ScopePart::Header(name, canonical) => {
                    header_scope(headers, name, canonical.as_ref())?
                }
                ScopePart::Host => {
                    inputs::host(request).map(|host| host.to_canonical().into_bytes())
                }
                ScopePart::Extension(read) => read(extensions).map(String::into_bytes),
            };
            match value {
                Some(value) if !value.is_empty() => hash_field(&mut hasher, &value),
                _ => return Err(Reason::ScopeMissing),
            }
        }
        Ok(format!(
            "{SCOPE_MARK}{}",
            hex_digest(hasher.finalize().as_slice())
        ))
    }
}

/// The value of header `name`, canonical when typed; `Ok(None)` when it
/// is absent or empty. A header sent twice is ambiguous (an application
/// may read either value): the request bypasses.
fn header_scope(
    headers: &HeaderMap,
    name: &HeaderName,
    canonical: Option<&Canonical>,
) -> Result<Option<Vec<u8>>, Reason> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Reason::ScopeAmbiguous);
    }
    if value.is_empty() {
        return Ok(None);
    }
    match canonical {
        Some(canonical) => canonical
            .apply(value.as_bytes())
            .map(|value| Some(value.into_owned()))
            .ok_or(Reason::BadParam),
        None => Ok(Some(value.as_bytes().to_vec())),
    }
}

/// The one owner of the key layout, used by reads, writes and the operator
/// handle alike:
///
/// - entries: `<ns>:<key>[:scope=<hash>]`, such as `app:person:42`;
/// - version keys: `{<ns>:<group>}:ver`, and for a group versioned per
///   scope also `{<ns>:<group>}:ver:scope=<hash>`;
/// - versioned entries: `{<ns>:<group>}:<before>` + versions joined by
///   `.` + `<after>[:scope=<hash>]`, such as
///   `{app:persons:list}:persons:list:v17:3fa9…`.
///
/// The braces are a Redis Cluster hash tag, derived from the group: a
/// version key and every entry under it hash to one slot, so a lookup reads
/// them with one `MGET` and a write checks them in one script, on a cluster
/// as on one server. Users never write braces (namespaces and templates
/// cannot hold them, parameters are percent-encoded).
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    namespace: String,
}

impl Layout {
    pub(crate) fn new(namespace: String) -> Self {
        Self { namespace }
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// An entry key from a rendered template and a scope suffix.
    pub(crate) fn entry(&self, key: &str, scope: &str) -> String {
        let mut out = String::with_capacity(self.namespace.len() + key.len() + scope.len() + 1);
        out.push_str(&self.namespace);
        out.push(':');
        out.push_str(key);
        out.push_str(scope);
        out
    }

    /// The version key of a rendered group, for every scope (`scope` empty)
    /// or for one.
    pub(crate) fn version(&self, group: &str, scope: &str, ttl: Duration) -> VersionKey {
        // Pushed piece by piece: `format!` costs a list hit more than this.
        let mut key = String::with_capacity(self.namespace.len() + group.len() + scope.len() + 7);
        key.push('{');
        key.push_str(&self.namespace);
        key.push(':');
        key.push_str(group);
        key.push_str("}:ver");
        key.push_str(scope);
        VersionKey::new(key, ttl)
    }

    /// A versioned entry key: the template split at `{version}`, under the
    /// hash tag of its version keys.
    pub(crate) fn versioned(
        &self,
        before: &str,
        after: &str,
        scope: &str,
        versions: Vec<VersionKey>,
    ) -> CacheKey {
        let tag = versions
            .first()
            .and_then(|v| {
                let end = v.key().bytes().position(|b| b == b'}')?;
                v.key().get(..=end)
            })
            .unwrap_or_default();
        let mut prefix = String::with_capacity(tag.len() + before.len() + 1);
        prefix.push_str(tag);
        prefix.push(':');
        prefix.push_str(before);
        let mut suffix = String::with_capacity(after.len() + scope.len());
        suffix.push_str(after);
        suffix.push_str(scope);
        CacheKey::Versioned {
            versions,
            prefix,
            suffix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slot;

    #[test]
    fn a_version_key_and_its_entries_share_a_slot() {
        let layout = Layout::new("app".to_owned());
        let all = layout.version("persons:list", "", Duration::from_secs(60));
        let mine = layout.version("persons:list", ":scope=ab12", Duration::from_secs(60));
        assert_eq!(all.key(), "{app:persons:list}:ver");
        let key = layout.versioned(
            "persons:list:v",
            ":3fa9",
            ":scope=ab12",
            vec![all.clone(), mine.clone()],
        );
        let entry = key.entry_key(&[b"17", b"18"]);
        assert_eq!(
            entry,
            "{app:persons:list}:persons:list:v17.18:3fa9:scope=ab12"
        );
        let slots = [all.key(), mine.key(), entry.as_str()].map(|k| slot(k.as_bytes()));
        assert!(slots.iter().all(|s| *s == slots[0]), "{slots:?}");
    }

    fn enc(raw: impl AsRef<[u8]>) -> String {
        let mut out = String::new();
        encode_param(raw.as_ref(), &mut out);
        out
    }

    #[test]
    fn params_are_encoded_injectively() {
        assert_eq!(enc("42"), "42");
        assert_eq!(enc("1:x"), "1%3Ax");
        assert_eq!(enc("*"), "%2A");
        assert_ne!(enc("%3A"), enc(":"));
        assert_ne!(enc("a~b"), enc("a%7Eb"));
        let long = "x".repeat(10_000);
        let encoded = enc(&long);
        assert!(encoded.starts_with('~') && encoded.len() == 1 + HASH_HEX_LEN);
        assert_ne!(encoded, enc("x".repeat(9_999)));
    }

    #[test]
    fn query_normalisation_sorts_and_drops_empties() {
        let rule = QueryRule::default();
        let a = QueryRule::hash(&rule.normalise(Some("b=2&a=1")));
        let b = QueryRule::hash(&rule.normalise(Some("a=1&b=2&c=")));
        let c = QueryRule::hash(&rule.normalise(Some("a=1&b=3")));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            rule.normalise(Some("name=a+b")),
            rule.normalise(Some("name=a%20b"))
        );
    }

    #[test]
    fn query_allowlist_ignores_other_params() {
        let rule = QueryRule {
            allowlist: Some(vec!["limit".into()]),
            ..QueryRule::default()
        };
        assert_eq!(
            rule.normalise(Some("limit=5&utm=x")),
            rule.normalise(Some("limit=5"))
        );
    }

    #[test]
    fn query_pairs_cannot_be_shifted_across_fields() {
        let rule = QueryRule::default();
        let a = QueryRule::hash(&rule.normalise(Some("ab=c")));
        let b = QueryRule::hash(&rule.normalise(Some("a=bc")));
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_escapes_do_not_panic() {
        for q in ["%", "%4", "a=%zz", "%%%", "a=%E2%82"] {
            let _ = QueryRule::default().normalise(Some(q));
        }
        assert_eq!(form_decode("%41%"), b"A%");
        assert_eq!(form_decode("%4"), b"%4");
    }

    #[test]
    fn template_rejects_unknown_params() {
        let params = vec!["id".to_owned()];
        assert!(KeyTemplate::parse("person:{id}", &params, true).is_ok());
        let err = KeyTemplate::parse("person:{pid}", &params, true).unwrap_err();
        assert!(err.to_string().contains("pid"), "{err}");
        assert!(KeyTemplate::parse("person:{id", &params, true).is_err());
        assert!(KeyTemplate::parse("v{version}{version}", &params, true).is_err());
    }

    #[test]
    fn pattern_params_include_catch_all() {
        assert_eq!(pattern_params("/a/{id}/b/{*rest}"), vec!["id", "rest"]);
    }

    fn request(headers: &[(&str, &str)], ext: Option<String>) -> http::Request<()> {
        let mut builder = http::Request::get("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(()).unwrap();
        if let Some(ext) = ext {
            request.extensions_mut().insert(ext);
        }
        request
    }

    #[test]
    fn a_scope_that_reads_nothing_fails_closed() {
        let scope = Scope::new().header("x-tenant-id");
        let missing = Err(Reason::ScopeMissing);
        assert_eq!(scope.key_suffix(&request(&[], None)), missing);
        assert_eq!(
            scope.key_suffix(&request(&[("x-tenant-id", "")], None)),
            missing
        );
        let suffix = scope
            .key_suffix(&request(&[("x-tenant-id", "acme")], None))
            .unwrap();
        assert!(suffix.starts_with(SCOPE_MARK) && !suffix.contains("acme"));
        let by_extension = Scope::new().extension(|ext| ext.get::<String>().cloned());
        assert_eq!(
            by_extension.key_suffix(&request(&[("x-tenant-id", "acme")], None)),
            missing
        );
        assert_eq!(
            by_extension.key_suffix(&request(&[], Some(String::new()))),
            missing
        );
        assert_eq!(Scope::new().host().key_suffix(&request(&[], None)), missing);
    }

    #[test]
    fn typed_scope_headers_key_their_canonical_form() {
        let scope = Scope::new().header_as("x-tenant-id", Canonical::case_insensitive());
        let of = |v: &str| scope.key_suffix(&request(&[("x-tenant-id", v)], None));
        assert_eq!(of("ACME"), of("acme"));
        assert_ne!(of("acme"), of("globex"));
        let ids = Scope::new().header_as("x-org", Canonical::integer());
        assert_eq!(
            ids.key_suffix(&request(&[("x-org", "x1")], None)),
            Err(Reason::BadParam)
        );
        let host = Scope::new().host();
        assert_eq!(
            host.key_suffix(&request(&[("host", "Acme.example")], None)),
            host.key_suffix(&request(&[("host", "acme.example:80")], None))
        );
        assert_ne!(
            host.key_suffix(&request(&[("host", "acme.example")], None)),
            host.key_suffix(&request(&[("host", "globex.example")], None))
        );
    }

    #[test]
    fn the_handler_gets_only_the_query_the_key_keeps() {
        let allow = QueryRule {
            allowlist: Some(vec!["limit".into()]),
            ..QueryRule::default()
        };
        assert_eq!(allow.stripped(Some("limit=5")), None);
        assert_eq!(
            allow.stripped(Some("limit=5&callback=evil")).as_deref(),
            Some("limit=5")
        );
        assert_eq!(allow.stripped(Some("callback=evil")).as_deref(), Some(""));
        let all = QueryRule::default();
        assert_eq!(all.stripped(Some("b=2&a=1")), None, "order is kept");
        assert_eq!(all.stripped(Some("a=1&name=")).as_deref(), Some("a=1"));
        let keep = QueryRule {
            keep_empty: true,
            ..QueryRule::default()
        };
        assert_eq!(keep.stripped(Some("a=1&name=")), None);
        assert_ne!(
            QueryRule::hash(&keep.normalise(Some("a=1&name="))),
            QueryRule::hash(&keep.normalise(Some("a=1")))
        );
    }

    #[test]
    fn only_clones_of_one_scope_are_the_same() {
        let claim = |name: &'static str| {
            Scope::new()
                .header("x-tenant-id")
                .extension(move |ext| ext.get::<String>().map(|v| format!("{name}{v}")))
        };
        let tenant = claim("t");
        assert!(tenant.same_as(&tenant.clone()));
        assert!(
            !tenant.same_as(&claim("t")),
            "same code, maybe other values"
        );
        assert!(!tenant.same_as(&claim("u")));
        assert!(!tenant.same_as(&Scope::new().header("x-tenant-id")));
        assert!(Scope::new().header("a").same_as(&Scope::new().header("a")));
    }

    #[test]
    fn path_params_are_keyed_decoded() {
        let enc_path = |raw: &str| enc(percent_decode(raw));
        assert_eq!(enc_path("61"), enc_path("%36%31"));
        assert_eq!(enc_path("61"), enc_path("6%31"));
        assert_eq!(enc_path("a@b"), enc_path("a%40b"));
        assert_eq!(enc_path("%C3%A9"), enc_path("%c3%a9"));
        assert_ne!(enc_path("a+b"), enc_path("a b"));
        assert_eq!(enc_path("100%"), "100%25");
    }
}
