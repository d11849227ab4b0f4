//! What the application served: the route axum matched (`MatchedPath`) and
//! the URI it received before a nested router stripped its prefix
//! (`OriginalUri`). With the `axum` feature these are read from the request
//! extensions axum sets; without it, or in a stack without axum, nothing is
//! known and the policy's own pattern match stands.

use http::{Extensions, Request, Uri};

/// How the route the application matched relates to a policy pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// No matched route on the request: the pattern match stands.
    Unknown,
    /// The application served this very pattern (param names aside).
    Same,
    /// The application served the pattern below a nested router's prefix.
    Nested,
    /// The application served another route (`/users/me` beside
    /// `/users/{id}`): the policy's pattern must not apply.
    Other,
}

/// A route pattern with its param names left out (`/users/{}`, `/files/{*}`),
/// so that a policy and an application that name one param differently
/// still agree on the route.
pub(crate) fn shape(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    write_shape(pattern, |piece| out.push_str(piece));
    out
}

/// Feeds the shape of `pattern` to `out`, piece by piece.
fn write_shape<'a>(pattern: &'a str, mut out: impl FnMut(&'a str)) {
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out(&rest[..open]);
        let after = &rest[open + 1..];
        if let Some(escaped) = after.strip_prefix('{') {
            out("{{");
            rest = escaped;
            continue;
        }
        let Some(close) = after.find('}') else {
            out(&rest[open..]);
            return;
        };
        out(if after.starts_with('*') { "{*}" } else { "{}" });
        rest = &after[close + 1..];
    }
    out(rest);
}

/// How the route the application matched for `extensions`' request relates
/// to the policy pattern of shape `pattern_shape` (see [`shape`]).
pub(crate) fn served_as(extensions: &Extensions, pattern_shape: &str) -> Served {
    let Some(matched) = matched_path(extensions) else {
        return Served::Unknown;
    };
    // Shaped on the stack: this runs on every request a router serves.
    let mut buffer = [0u8; 256];
    let mut len = 0;
    let mut spilled: Option<String> = None;
    write_shape(matched, |piece| match &mut spilled {
        Some(out) => out.push_str(piece),
        None if len + piece.len() <= buffer.len() => {
            buffer[len..len + piece.len()].copy_from_slice(piece.as_bytes());
            len += piece.len();
        }
        None => {
            let mut out = String::from_utf8_lossy(&buffer[..len]).into_owned();
            out.push_str(piece);
            spilled = Some(out);
        }
    });
    let matched = match &spilled {
        Some(out) => out.as_bytes(),
        None => &buffer[..len],
    };
    let pattern = pattern_shape.as_bytes();
    if matched == pattern {
        Served::Same
    } else if matched.len() > pattern.len() && matched.ends_with(pattern) {
        Served::Nested
    } else {
        Served::Other
    }
}

/// The part of the path the application received that a nested router
/// stripped before this layer saw the request (`/shops/a` of
/// `/shops/a/items/1`), or the whole received path when the layer's path
/// is not a tail of it (a layer rewrote it). `None` when the layer sees the
/// path as received.
pub(crate) fn stripped_prefix<B>(request: &Request<B>) -> Option<&str> {
    let original = original_uri(request.extensions())?.path();
    let seen = request.uri().path();
    if original == seen {
        return None;
    }
    Some(original.strip_suffix(seen).unwrap_or(original))
}

/// Strips from the copy of the URI the application received (axum's
/// `OriginalUri`) what the key dropped from the request's query: the
/// handler reads no copy of the URI with an input the key ignores.
/// `stripped` is the query the request keeps, when the key dropped part of
/// it; `strip` makes the same of another query (a layer rewrote the URI).
/// Call it before the request's own URI is rewritten.
pub(crate) fn strip_original_query<B>(
    request: &mut Request<B>,
    stripped: Option<&str>,
    strip: impl FnOnce(Option<&str>) -> Option<String>,
) {
    let Some(original) = original_uri(request.extensions()) else {
        return;
    };
    let rewritten = match (original.query() == request.uri().query(), stripped) {
        (true, None) => return,
        (true, Some(query)) => with_query(original, query),
        (false, _) => match strip(original.query()) {
            Some(query) => with_query(original, &query),
            None => return,
        },
    };
    if let (Some(uri), Some(slot)) = (rewritten, original_uri_mut(request.extensions_mut())) {
        *slot = uri;
    }
}

/// `uri` with `query` (none when empty) in place of its own.
pub(crate) fn with_query(uri: &Uri, query: &str) -> Option<Uri> {
    let path = uri.path();
    let path_and_query = match query.is_empty() {
        true => path.to_owned(),
        false => format!("{path}?{query}"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(path_and_query).ok();
    Uri::from_parts(parts).ok()
}

#[cfg(feature = "axum")]
fn matched_path(extensions: &Extensions) -> Option<&str> {
    extensions
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str())
}

#[cfg(feature = "axum")]
fn original_uri(extensions: &Extensions) -> Option<&Uri> {
    extensions.get::<axum::extract::OriginalUri>().map(|o| &o.0)
}

#[cfg(feature = "axum")]
fn original_uri_mut(extensions: &mut Extensions) -> Option<&mut Uri> {
    extensions
        .get_mut::<axum::extract::OriginalUri>()
        .map(|o| &mut o.0)
}

#[cfg(not(feature = "axum"))]
fn matched_path(_: &Extensions) -> Option<&str> {
    None
}

#[cfg(not(feature = "axum"))]
fn original_uri(_: &Extensions) -> Option<&Uri> {
    None
}

#[cfg(not(feature = "axum"))]
fn original_uri_mut(_: &mut Extensions) -> Option<&mut Uri> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_leave_param_names_out() {
        assert_eq!(shape("/users/{id}"), "/users/{}");
        assert_eq!(shape("/users/{user_id}"), shape("/users/{id}"));
        assert_eq!(shape("/files/{*path}"), "/files/{*}");
        assert_eq!(shape("/users/me"), "/users/me");
        assert_eq!(shape("/a/{{x}}/{b}"), "/a/{{x}}/{}");
        assert_ne!(shape("/files/{*path}"), shape("/files/{path}"));
        let long = format!("/{}/{{id}}", "a".repeat(300));
        assert_eq!(shape(&long), format!("/{}/{{}}", "a".repeat(300)));
    }

    #[cfg(feature = "axum")]
    #[test]
    fn the_matched_route_decides() {
        let with = |matched: &str| {
            let mut ext = Extensions::new();
            // `MatchedPath` has no public constructor: take it from axum.
            let request = axum_matched(matched);
            ext.extend(request.extensions().clone());
            ext
        };
        let item = shape("/users/{id}");
        assert_eq!(served_as(&Extensions::new(), &item), Served::Unknown);
        assert_eq!(served_as(&with("/users/{id}"), &item), Served::Same);
        assert_eq!(served_as(&with("/users/{uid}"), &item), Served::Same);
        assert_eq!(served_as(&with("/users/me"), &item), Served::Other);
        assert_eq!(
            served_as(&with("/shops/{shop}/users/{id}"), &item),
            Served::Nested
        );
        // Longer than the stack buffer.
        let long = format!("/{}/users/{{id}}", "a".repeat(300));
        assert_eq!(served_as(&with(&long), &item), Served::Nested);
        assert_eq!(served_as(&with(&long), &shape(&long)), Served::Same);
    }

    /// A request as axum hands it to a layer on the route `pattern`.
    #[cfg(feature = "axum")]
    fn axum_matched(pattern: &str) -> Request<()> {
        use std::sync::{Arc, Mutex};
        use tower::ServiceExt;
        let seen = Arc::new(Mutex::new(None));
        let keep = seen.clone();
        let app = axum::Router::new().route(
            pattern,
            axum::routing::get(move |request: axum::extract::Request| {
                let keep = keep.clone();
                async move {
                    let (parts, _) = request.into_parts();
                    *keep.lock().unwrap() = Some(Request::from_parts(parts, ()));
                }
            }),
        );
        let path = pattern.replace(['{', '}', '*'], "");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            app.oneshot(Request::get(path).body(axum::body::Body::empty()).unwrap())
                .await
                .unwrap();
        });
        let request = seen.lock().unwrap().take().unwrap();
        request
    }
}
