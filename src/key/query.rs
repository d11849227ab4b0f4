//! The normalised query: what `{query_hash}` hashes, and what of the query
//! the handler gets.

use sha2::{Digest, Sha256};

use super::{hash_field, hex_digest, hex_val};

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
pub(super) fn form_decode(text: &str) -> Vec<u8> {
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
