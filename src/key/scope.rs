//! Scopes: the request parts (headers, the host, values an auth layer put
//! in the extensions) hashed into a key.

use std::sync::Arc;

use http::{Extensions, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use super::{hash_field, hex_digest, inputs, Canonical};
use crate::error::ConfigError;
use crate::reason::Reason;

/// What separates a key from its scope hash: `app:person:42:scope=<hash>`.
pub(crate) const SCOPE_MARK: &str = ":scope=";

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
