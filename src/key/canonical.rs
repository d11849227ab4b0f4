//! Canonical forms of path parameters and scope values: the spellings a
//! handler reads as one value share one key.

use std::borrow::Cow;
use std::sync::Arc;

/// How a path parameter or a scope value is read by the handler, so that
/// every spelling it treats as one value renders one key.
///
/// A value that does not parse bypasses the cache (reason `bad-param`); a
/// write whose URL holds one purges nothing under that name (counted as
/// [`InvalidationStats::unparsed`](crate::InvalidationStats::unparsed)).
///
/// Canonical forms only ever merge spellings the handler's extractor merges
/// too (a merge the handler does not make would serve one value's entry for
/// another): `integer` keeps `-0` apart from `0`, `case_insensitive` folds
/// ASCII letters only.
///
/// ```
/// use tower_redis_cache::{Canonical, Route, Scope};
///
/// // `Path<u64>`: `/items/01`, `/items/+1` and `/items/1` are one row.
/// let item = Route::get("/items/{id}")
///     .key("item:{id}")
///     .param("id", Canonical::integer())
///     .scope(Scope::new().header_as("x-tenant-id", Canonical::case_insensitive()));
/// # let _ = item;
/// ```
#[derive(Clone)]
pub struct Canonical {
    kind: Kind,
}

/// A user's canonicalising function.
type CanonicalFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Clone)]
enum Kind {
    Integer,
    Uuid,
    CaseInsensitive,
    Custom(CanonicalFn),
}

impl std::fmt::Debug for Canonical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Integer => "Canonical::integer",
            Kind::Uuid => "Canonical::uuid",
            Kind::CaseInsensitive => "Canonical::case_insensitive",
            Kind::Custom(_) => "Canonical::with",
        })
    }
}

impl Canonical {
    /// A decimal integer as Rust's integer parsing (axum's `Path<u64>`,
    /// `Path<i64>`) reads it: an optional sign, then digits. `01`, `+1` and
    /// `1` are one value; `-0` stays apart from `0` (an unsigned extractor
    /// refuses it). Anything else does not parse.
    pub fn integer() -> Self {
        Self {
            kind: Kind::Integer,
        }
    }

    /// A UUID in any of the forms `uuid::Uuid::parse_str` reads (hyphenated,
    /// simple, braced, `urn:uuid:`), in either case: keyed lower-case and
    /// hyphenated.
    pub fn uuid() -> Self {
        Self { kind: Kind::Uuid }
    }

    /// Text the handler compares without ASCII case: `Acme` and `acme` are
    /// one value. Letters outside ASCII keep their case.
    pub fn case_insensitive() -> Self {
        Self {
            kind: Kind::CaseInsensitive,
        }
    }

    /// A function of the decoded value: the canonical form, or `None` when
    /// the handler would refuse the value. It must give one output for
    /// exactly the spellings the handler reads as one value.
    pub fn with<F>(canonicalise: F) -> Self
    where
        F: Fn(&str) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            kind: Kind::Custom(Arc::new(canonicalise)),
        }
    }

    /// True when both canonicalise alike (the same built-in form, or the
    /// very same function).
    pub(crate) fn same_as(&self, other: &Canonical) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::Integer, Kind::Integer)
            | (Kind::Uuid, Kind::Uuid)
            | (Kind::CaseInsensitive, Kind::CaseInsensitive) => true,
            (Kind::Custom(a), Kind::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The canonical form of `raw` (already percent-decoded), `None` when
    /// it does not parse.
    pub(crate) fn apply<'a>(&self, raw: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        let text = std::str::from_utf8(raw).ok()?;
        match &self.kind {
            Kind::Integer => integer(text),
            Kind::Uuid => uuid(text).map(|u| Cow::Owned(u.into_bytes())),
            Kind::CaseInsensitive => match text.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Some(Cow::Owned(text.to_ascii_lowercase().into_bytes())),
                false => Some(Cow::Borrowed(raw)),
            },
            Kind::Custom(canonicalise) => canonicalise(text).map(|c| Cow::Owned(c.into_bytes())),
        }
    }
}

fn integer(text: &str) -> Option<Cow<'_, [u8]>> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
    if !negative && trimmed.len() == text.len() {
        return Some(Cow::Borrowed(text.as_bytes()));
    }
    let mut out = Vec::with_capacity(trimmed.len() + 1);
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(trimmed.as_bytes());
    Some(Cow::Owned(out))
}

fn uuid(text: &str) -> Option<String> {
    let inner = if let Some(rest) = text
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case("urn:uuid:"))
        .map(|_| &text[9..])
    {
        rest
    } else if let Some(rest) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        rest
    } else {
        text
    };
    let hex: String = match inner.len() {
        32 => inner.to_owned(),
        36 => {
            let bytes = inner.as_bytes();
            if [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
                return None;
            }
            inner.replace('-', "")
        }
        _ => return None,
    };
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hex = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(c: &Canonical, raw: &str) -> Option<String> {
        c.apply(raw.as_bytes())
            .map(|v| String::from_utf8(v.into_owned()).unwrap())
    }

    #[test]
    fn integers_merge_what_rust_parsing_merges() {
        let int = Canonical::integer();
        for (raw, want) in [
            ("1", "1"),
            ("01", "1"),
            ("+1", "1"),
            ("004", "4"),
            ("0", "0"),
            ("000", "0"),
            ("-01", "-1"),
            ("-0", "-0"),
        ] {
            assert_eq!(canon(&int, raw).as_deref(), Some(want), "{raw}");
        }
        for raw in ["", "+", "-", "1a", " 1", "1.0", "0x1", "--1", "+-1"] {
            assert_eq!(canon(&int, raw), None, "{raw}");
        }
        // Where Rust's parsing agrees, so does the canonical form.
        for (a, b) in [("01", "1"), ("+3", "3"), ("004", "4")] {
            assert_eq!(a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap());
            assert_eq!(canon(&int, a), canon(&int, b));
        }
        assert!("-0".parse::<u64>().is_err());
        assert_ne!(canon(&int, "-0"), canon(&int, "0"));
    }

    #[test]
    fn uuids_in_every_form_and_case_are_one() {
        let want = Some("67e55044-10b1-426f-9247-bb680e5fe0c8".to_owned());
        let uuid = Canonical::uuid();
        for raw in [
            "67e55044-10b1-426f-9247-bb680e5fe0c8",
            "67E55044-10B1-426F-9247-BB680E5FE0C8",
            "67e5504410b1426f9247bb680e5fe0c8",
            "{67e55044-10b1-426f-9247-bb680e5fe0c8}",
            "urn:uuid:67e55044-10b1-426f-9247-bb680e5fe0c8",
        ] {
            assert_eq!(canon(&uuid, raw), want, "{raw}");
        }
        for raw in [
            "67e55044-10b1-426f-9247-bb680e5fe0c",
            "67e55044x10b1-426f-9247-bb680e5fe0c8",
            "g7e55044-10b1-426f-9247-bb680e5fe0c8",
            "",
        ] {
            assert_eq!(canon(&uuid, raw), None, "{raw}");
        }
    }

    #[test]
    fn case_folding_is_ascii_only() {
        let ci = Canonical::case_insensitive();
        assert_eq!(canon(&ci, "AcMe").as_deref(), Some("acme"));
        assert_eq!(canon(&ci, "É").as_deref(), Some("É"));
        let custom = Canonical::with(|v| v.strip_prefix("t-").map(str::to_owned));
        assert_eq!(canon(&custom, "t-1").as_deref(), Some("1"));
        assert_eq!(canon(&custom, "1"), None);
        assert!(custom.same_as(&custom.clone()));
        assert!(!custom.same_as(&Canonical::with(|v| Some(v.to_owned()))));
    }
}
