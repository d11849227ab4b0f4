//! Key templates, path-parameter encoding, query normalisation and scopes.
//!
//! Every function here is deterministic and injective where it matters: two
//! requests that differ in a path parameter, a relevant query parameter or a
//! scope value never render the same key.
//!
//! # What the key covers
//!
//! What each input a handler can read does to the cache (`docs/key.md`
//! holds the same table). Inputs marked "bound" are not in the key string: each
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

use sha2::{Digest, Sha256};

mod cache_key;
mod canonical;
mod inputs;
mod layout;
mod query;
mod scope;
pub(crate) mod served;
mod template;
#[cfg(test)]
mod tests;

pub use cache_key::{CacheKey, VersionKey};
pub use canonical::Canonical;
pub(crate) use inputs::{Binding, InputRules, BINDING_LEN};
pub(crate) use layout::Layout;
pub(crate) use query::QueryRule;
pub use scope::Scope;
pub(crate) use template::{pattern_params, percent_decode, KeyTemplate, Params, Rendered, Segment};

/// Hex characters kept from a SHA-256 digest (128 bits).
const HASH_HEX_LEN: usize = 32;

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

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}
