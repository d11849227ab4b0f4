//! The inputs of a request that a handler may read beyond its path, query
//! and scope: the host, forwarded headers, the headers a route varies on.
//! They are bound into each entry (see [`Binding`]), so an entry is served
//! only to requests that agree on all of them; the inputs the cache cannot
//! cover (a body on a GET, headers that rewrite the request) bypass it.

use http::{HeaderMap, HeaderName, Request};
use sha2::{Digest, Sha256};

use super::hash_field;
use super::CacheKey;
use crate::reason::Reason;

/// Headers through which proxies tell the application its public host,
/// scheme, port or prefix, and which servers and frameworks honour: bound
/// into every entry when present, unless the policy trusts them.
pub(crate) const FORWARDED: [HeaderName; 13] = [
    http::header::FORWARDED,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-uri"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-original-host"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("front-end-https"),
];

/// Headers that make some frameworks handle another path or method than
/// the request line says: a request carrying one bypasses the cache.
pub(crate) const REWRITING: [HeaderName; 5] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Bytes of the digest an entry carries.
pub(crate) const BINDING_LEN: usize = 8;

/// A short digest of what an entry may be served for: its key (the
/// version-free part of a versioned key) and the request inputs above.
/// Written into the entry and compared on every hit, so an entry handed to
/// another key, host or variant is a miss.
pub(crate) type Binding = [u8; BINDING_LEN];

/// What the policy says of hosts and forwarded headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct InputRules {
    /// The only hosts served from the cache (empty: any host, bound into
    /// the entry).
    pub(crate) hosts: Vec<String>,
    /// Forwarded headers set by the deployment's own proxy (constant):
    /// left out of the binding.
    pub(crate) trusted: Vec<HeaderName>,
}

/// What one pass over a request's headers found: the forwarded headers
/// present (bit `i` for `FORWARDED[i]`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Scan {
    forwarded: u16,
}

/// Where `name` stands among the headers this module reads: the index of a
/// forwarded header, a rewriting one, or one that announces a body.
enum Class {
    Forwarded(usize),
    Rewriting,
    Body,
}

fn classify(name: &str) -> Option<Class> {
    // One comparison chain per header (a `HeaderMap` lookup per name would
    // hash each of these twenty names on every request).
    if let Some(at) = FORWARDED.iter().position(|f| f.as_str() == name) {
        return Some(Class::Forwarded(at));
    }
    if REWRITING.iter().any(|r| r.as_str() == name) {
        return Some(Class::Rewriting);
    }
    matches!(name, "content-length" | "transfer-encoding").then_some(Class::Body)
}

impl InputRules {
    /// Why `request` must not use the cache, if it must not: a header that
    /// rewrites it, a body, a host outside the policy's. Else what the
    /// binding needs of its headers.
    pub(crate) fn scan<B>(&self, request: &Request<B>) -> Result<Scan, Reason> {
        let mut scan = Scan::default();
        for (name, value) in request.headers() {
            let Some(class) = name
                .as_str()
                .starts_with(['x', 'f', 'c', 't'])
                .then(|| classify(name.as_str()))
                .flatten()
            else {
                continue;
            };
            match class {
                Class::Forwarded(at) => scan.forwarded |= 1 << at,
                Class::Rewriting => return Err(Reason::Rewrite),
                Class::Body if *name == http::header::TRANSFER_ENCODING => {
                    return Err(Reason::RequestBody)
                }
                Class::Body if value.as_bytes().iter().any(|&b| b != b'0') => {
                    return Err(Reason::RequestBody)
                }
                Class::Body => {}
            }
        }
        // Userinfo (`user:pass@host`) is a credential no key covers.
        if request
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().contains('@'))
        {
            return Err(Reason::Authorization);
        }
        if !self.hosts.is_empty() {
            // Both names of the host, when a request gives two (an
            // absolute URI and a `Host` header), must be the policy's.
            let named = |host: Host<'_>| self.hosts.iter().any(|h| host.eq(h));
            let (authority, header) = hosts(request);
            let given = [authority, header];
            if given.iter().all(Option::is_none) || !given.into_iter().flatten().all(named) {
                return Err(Reason::Host);
            }
        }
        Ok(scan)
    }

    /// The binding of an entry under `key` for `request` (whose headers
    /// `scan` read); `vary` are the request headers the route varies on.
    /// `route` feeds what the route binds beyond the request's headers
    /// (itself, a nested router's prefix, params the key leaves out).
    pub(crate) fn binding<B>(
        &self,
        key: &CacheKey,
        request: &Request<B>,
        scan: Scan,
        vary: &[HeaderName],
        route: impl FnOnce(&mut Sha256),
    ) -> Binding {
        let mut hasher = Sha256::new();
        route(&mut hasher);
        // An absolute-form request names its scheme, which handlers read
        // (`Uri::scheme`); origin-form names none. One byte for the usual
        // ones: the digest of a short key stays one SHA-256 block.
        match request.uri().scheme() {
            None => hasher.update([0]),
            Some(scheme) if *scheme == http::uri::Scheme::HTTP => hasher.update([1]),
            Some(scheme) if *scheme == http::uri::Scheme::HTTPS => hasher.update([2]),
            Some(scheme) => {
                hasher.update([3]);
                hash_field(&mut hasher, scheme.as_str().to_ascii_lowercase().as_bytes());
            }
        }
        match key {
            CacheKey::Plain(key) => hash_field(&mut hasher, key.as_bytes()),
            CacheKey::Versioned {
                versions,
                prefix,
                suffix,
            } => {
                hash_field(&mut hasher, prefix.as_bytes());
                hash_field(&mut hasher, suffix.as_bytes());
                for version in versions {
                    hash_field(&mut hasher, version.key().as_bytes());
                }
            }
        }
        // A request may name its host twice (an absolute URI and a `Host`
        // header) and handlers read either: both are bound, as one when
        // they agree.
        match hosts(request) {
            (Some(authority), Some(header)) if !authority.eq_host(header) => {
                authority.hash_into(&mut hasher);
                header.hash_into(&mut hasher);
            }
            (Some(host), _) | (None, Some(host)) => host.hash_into(&mut hasher),
            (None, None) => hash_field(&mut hasher, b""),
        }
        let headers = request.headers();
        for (at, name) in FORWARDED.iter().enumerate() {
            if scan.forwarded & (1 << at) == 0 || self.trusted.contains(name) {
                continue;
            }
            hash_field(&mut hasher, name.as_str().as_bytes());
            let values = headers.get_all(name);
            hasher.update((values.iter().count() as u64).to_be_bytes());
            for value in values {
                if *name == http::header::FORWARDED {
                    forwarded_parts(value.as_bytes(), &mut hasher);
                } else {
                    hash_field(&mut hasher, value.as_bytes());
                }
            }
        }
        for name in vary {
            hash_field(&mut hasher, name.as_str().as_bytes());
            hash_field(&mut hasher, vary_value(name, headers).as_bytes());
        }
        let digest = hasher.finalize();
        let mut binding = [0; BINDING_LEN];
        binding.copy_from_slice(&digest[..BINDING_LEN]);
        binding
    }
}

/// A request's host as written (the URI's authority, else `Host`), read
/// as the handler may read it: compared without ASCII case, the scheme's
/// default port dropped. Borrowed from the request: no allocation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Host<'a>(&'a str);

impl<'a> Host<'a> {
    /// The host `raw` names, `default_port` dropped.
    fn named(raw: &'a str, default_port: &str) -> Self {
        let raw = raw.trim();
        Host(raw.strip_suffix(default_port).unwrap_or(raw))
    }

    /// Equal to `canonical` (lower-case, default port dropped).
    pub(crate) fn eq(self, canonical: &str) -> bool {
        self.0.eq_ignore_ascii_case(canonical)
    }

    /// Equal to `other`, both read as the handler may read them.
    fn eq_host(self, other: Host<'_>) -> bool {
        self.0.eq_ignore_ascii_case(other.0)
    }

    /// The canonical form, lower-cased.
    pub(crate) fn to_canonical(self) -> String {
        self.0.to_ascii_lowercase()
    }

    fn hash_into(self, hasher: &mut Sha256) {
        hasher.update((self.0.len() as u64).to_be_bytes());
        let mut buf = [0u8; 64];
        for chunk in self.0.as_bytes().chunks(buf.len()) {
            let lower = &mut buf[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            hasher.update(&*lower);
        }
    }
}

/// The request's host: the URI's authority, else `Host`, the scheme's
/// default port dropped. `None` when the request names none.
pub(crate) fn host<B>(request: &Request<B>) -> Option<Host<'_>> {
    let (authority, header) = hosts(request);
    authority.or(header)
}

/// The two names a request may give its host: the URI's authority (an
/// absolute URI, HTTP/2's `:authority`) and the `Host` header, each with
/// the scheme's default port dropped.
fn hosts<B>(request: &Request<B>) -> (Option<Host<'_>>, Option<Host<'_>>) {
    let default_port = match request.uri().scheme_str() {
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => ":443",
        _ => ":80",
    };
    let authority = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().rsplit('@').next())
        .map(|raw| Host::named(raw, default_port));
    let header = request
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|raw| Host::named(raw, default_port));
    (authority, header)
}

/// Feeds the `host` and `proto` parameters of a `Forwarded` value (RFC
/// 7239), in order: `for` and `by` differ per client and are left out.
fn forwarded_parts(value: &[u8], hasher: &mut Sha256) {
    let Ok(value) = std::str::from_utf8(value) else {
        hash_field(hasher, value);
        return;
    };
    for element in value.split(',') {
        for pair in element.split(';') {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let name = name.trim();
            if name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case("proto") {
                hash_field(hasher, name.to_ascii_lowercase().as_bytes());
                hash_field(hasher, value.trim().trim_matches('"').as_bytes());
            }
        }
        hash_field(hasher, b",");
    }
}

/// The value of a header a route varies on, as sent: each value
/// length-prefixed, no case folding or trimming (a CORS layer or a handler
/// may tell `https://A.example` from `https://a.example`). Only
/// `Accept-Encoding`, which this cache negotiates itself, is read as the
/// set of codings accepted (as Varnish normalises it). Absent reads as
/// `\0`, apart from any value.
pub(crate) fn vary_value(name: &HeaderName, headers: &HeaderMap) -> String {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        return "\0".to_owned();
    }
    if *name != http::header::ACCEPT_ENCODING {
        let mut out = String::new();
        for value in values {
            let value = String::from_utf8_lossy(value.as_bytes());
            out.push_str(&value.len().to_string());
            out.push(':');
            out.push_str(&value);
        }
        return out;
    }
    let items = values
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|i| i.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|i| !i.is_empty());
    let mut codings: Vec<String> = items
        .filter_map(|item| {
            let mut parts = item.split(';');
            let coding = parts.next()?.trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (!refused).then_some(coding)
        })
        .collect();
    codings.sort();
    codings.dedup();
    codings.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn binding(rules: &InputRules, request: &Request<()>) -> Binding {
        bind(rules, "app:k", request)
    }

    fn bind(rules: &InputRules, key: &str, request: &Request<()>) -> Binding {
        let scan = rules.scan(request).unwrap();
        rules.binding(&CacheKey::Plain(key.into()), request, scan, &[], |_| {})
    }

    #[test]
    fn hosts_read_as_the_handler_reads_them() {
        let host_of =
            |uri: &str, h: &[(&str, &str)]| host(&request(uri, h)).map(Host::to_canonical);
        assert_eq!(
            host_of("/", &[("host", "Acme.Example")]).as_deref(),
            Some("acme.example")
        );
        assert_eq!(
            host_of("/", &[("host", "acme.example:80")]).as_deref(),
            Some("acme.example")
        );
        assert_eq!(
            host_of("/", &[("host", "acme.example:8080")]).as_deref(),
            Some("acme.example:8080")
        );
        assert_eq!(
            host_of("https://acme.example:443/", &[("host", "x")]).as_deref(),
            Some("acme.example")
        );
        assert_eq!(host_of("/", &[]), None);
    }

    #[test]
    fn every_input_but_trusted_ones_changes_the_binding() {
        let rules = InputRules::default();
        let clean = binding(&rules, &request("/", &[("host", "a.example")]));
        assert_eq!(
            clean,
            binding(&rules, &request("/", &[("host", "A.example:80")]))
        );
        assert_ne!(
            clean,
            binding(&rules, &request("/", &[("host", "b.example")]))
        );
        for name in FORWARDED.iter().skip(1) {
            let odd = request(
                "/",
                &[("host", "a.example"), (name.as_str(), "evil.example")],
            );
            assert_ne!(clean, binding(&rules, &odd), "{name}");
        }
        let forwarded = |v: &str| {
            binding(
                &rules,
                &request("/", &[("host", "a.example"), ("forwarded", v)]),
            )
        };
        assert_ne!(forwarded("host=evil.example"), clean);
        assert_ne!(forwarded("proto=https"), forwarded("proto=http"));
        assert_eq!(
            forwarded("for=1.2.3.4;proto=https"),
            forwarded("for=5.6.7.8;proto=https")
        );
        let trusting = InputRules {
            trusted: vec![HeaderName::from_static("x-forwarded-proto")],
            ..InputRules::default()
        };
        assert_eq!(
            binding(
                &trusting,
                &request(
                    "/",
                    &[("host", "a.example"), ("x-forwarded-proto", "https")]
                )
            ),
            binding(&trusting, &request("/", &[("host", "a.example")]))
        );
        assert_ne!(
            bind(&rules, "app:other", &request("/", &[("host", "a.example")])),
            clean
        );
    }

    #[test]
    fn forwarded_values_cannot_pass_for_another_header() {
        let rules = InputRules::default();
        let mut shifted = request("/", &[("host", "a.example")]);
        for value in ["a.example", "x-forwarded-proto", "https"] {
            shifted
                .headers_mut()
                .append("x-forwarded-host", value.parse().unwrap());
        }
        let split = request(
            "/",
            &[
                ("host", "a.example"),
                ("x-forwarded-host", "a.example"),
                ("x-forwarded-proto", "https"),
            ],
        );
        assert_ne!(binding(&rules, &shifted), binding(&rules, &split));
    }

    #[test]
    fn a_host_header_beside_an_absolute_uri_is_bound_too() {
        let rules = InputRules::default();
        let clean = binding(&rules, &request("http://a.example/", &[]));
        assert_eq!(
            clean,
            binding(
                &rules,
                &request("http://A.example/", &[("host", "a.example")])
            ),
            "one host, named twice"
        );
        assert_ne!(
            clean,
            binding(&rules, &request("/", &[("host", "a.example")])),
            "a scheme the handler can read, where origin-form names none"
        );
        assert_ne!(
            clean,
            binding(&rules, &request("https://a.example/", &[])),
            "another scheme"
        );
        assert_eq!(
            rules
                .scan(&request("http://user:pass@a.example/", &[]))
                .err(),
            Some(Reason::Authorization),
            "userinfo is a credential no key covers"
        );
        assert_ne!(
            clean,
            binding(
                &rules,
                &request("http://a.example/", &[("host", "evil.example")])
            )
        );
        let named = InputRules {
            hosts: vec!["a.example".into()],
            ..InputRules::default()
        };
        let refused = |uri: &str, h: &[(&str, &str)]| named.scan(&request(uri, h)).err();
        assert_eq!(refused("http://a.example/", &[("host", "a.example")]), None);
        assert_eq!(
            refused("http://a.example/", &[("host", "evil.example")]),
            Some(Reason::Host)
        );
    }

    #[test]
    fn rewrites_bodies_and_foreign_hosts_are_refused() {
        let rules = InputRules {
            hosts: vec!["api.example".into()],
            ..InputRules::default()
        };
        let refused = |h: &[(&str, &str)]| rules.scan(&request("/", h)).err();
        assert_eq!(refused(&[("host", "api.example")]), None);
        assert_eq!(refused(&[("host", "API.example:80")]), None);
        assert_eq!(refused(&[("host", "evil.example")]), Some(Reason::Host));
        assert_eq!(refused(&[]), Some(Reason::Host));
        for name in REWRITING.iter() {
            assert_eq!(
                refused(&[("host", "api.example"), (name.as_str(), "/admin")]),
                Some(Reason::Rewrite)
            );
        }
        assert_eq!(
            refused(&[("host", "api.example"), ("content-length", "3")]),
            Some(Reason::RequestBody)
        );
        assert_eq!(
            refused(&[("host", "api.example"), ("content-length", "0")]),
            None
        );
        assert_eq!(
            refused(&[("host", "api.example"), ("transfer-encoding", "chunked")]),
            Some(Reason::RequestBody)
        );
    }

    #[test]
    fn vary_values_are_normalised() {
        let value = |name: &str, v: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(v) = v {
                headers.insert(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            vary_value(&HeaderName::from_bytes(name.as_bytes()).unwrap(), &headers)
        };
        assert_eq!(
            value("accept-encoding", Some("gzip, br;q=0, zstd")),
            "gzip,zstd"
        );
        assert_eq!(
            value("accept-encoding", Some("zstd,gzip")),
            value("accept-encoding", Some("GZIP , zstd"))
        );
        // Other headers are keyed as sent: a CORS layer or a handler may
        // tell these apart.
        assert_ne!(
            value("origin", Some("HTTPS://A.example")),
            value("origin", Some("https://a.example"))
        );
        assert_ne!(
            value("accept-language", Some("en, fr")),
            value("accept-language", Some("en,fr"))
        );
        assert_ne!(value("origin", None), value("origin", Some("")));
    }
}
