//! The policy's unit tests: building, planning, hostile input.

use std::time::Duration;

use http::Request;

use super::*;
use crate::error::ConfigError;
use crate::key::Scope;
use crate::reason::Reason;
use crate::store::CacheKey;

fn policy() -> Policy {
    Policy::builder()
        .route(Route::get("/persons/{id}").key("person:{id}"))
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list"),
        )
        .route(
            Route::get("/tenants/{t}/persons/{id}")
                .key("tenant:{t}:person:{id}")
                .scope(Scope::new().header("x-tenant-id")),
        )
        .build()
        .unwrap()
}

fn key_of(policy: &Policy, request: Request<()>) -> Option<CacheKey> {
    match policy.plan(&request) {
        Decision::Cache { key, .. } => Some(key),
        _ => None,
    }
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

#[test]
fn item_keys_read_namespace_then_template() {
    assert_eq!(
        key_of(&policy(), get("/persons/42")),
        Some(CacheKey::Plain("app:person:42".into()))
    );
}

#[test]
fn list_keys_are_versioned() {
    let Some(CacheKey::Versioned {
        versions,
        prefix,
        suffix,
    }) = key_of(&policy(), get("/persons?limit=5"))
    else {
        panic!("expected a versioned key");
    };
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].key(), "{app:persons:list}:ver");
    assert_eq!(versions[0].ttl(), Duration::from_secs(60));
    assert_eq!(prefix, "{app:persons:list}:persons:list:v");
    assert!(suffix.starts_with(':') && suffix.len() == 33, "{suffix}");
}

fn tenant() -> Scope {
    Scope::new().header("x-tenant-id")
}

fn tenant_policy() -> Policy {
    Policy::builder()
        .route(
            Route::get("/persons/{id}")
                .key("person:{id}")
                .scope(tenant()),
        )
        .route(
            Route::get("/persons")
                .key("persons:list:v{version}:{query_hash}")
                .versioned_by("persons:list")
                .per_scope()
                .ttl(Duration::from_secs(30))
                .stale_while_revalidate(Duration::from_secs(15))
                .scope(tenant()),
        )
        .on(Rule::new("POST /persons").bump("persons:list"))
        .on(Rule::new("PATCH|DELETE /persons/{id}")
            .purge("GET /persons/{id}")
            .bump("persons:list"))
        .build()
        .unwrap()
}

fn as_tenant(method: &str, uri: &str, tenant: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("x-tenant-id", tenant)
        .body(())
        .unwrap()
}

#[test]
fn rules_take_namespace_scope_and_layout_from_the_routes() {
    let p = tenant_policy();
    let read = key_of(&p, as_tenant("GET", "/persons/42", "acme")).unwrap();
    let owed = p
        .invalidation(&as_tenant("PATCH", "/persons/42", "acme"))
        .unwrap();
    assert!(owed.complete && owed.on_drop.is_none());
    let write = owed.invalidation;
    assert_eq!(write.deletes(), [read.entry_key(&[])]);
    let CacheKey::Versioned { versions, .. } =
        key_of(&p, as_tenant("GET", "/persons", "acme")).unwrap()
    else {
        panic!("versioned");
    };
    // A tenant's write bumps that tenant's lists only.
    assert_eq!(write.bumps(), &versions[1..]);
    assert!(versions[1]
        .key()
        .starts_with("{app:persons:list}:ver:scope="));
    assert_eq!(versions[0].key(), "{app:persons:list}:ver");
    assert_eq!(
        versions[1].ttl(),
        Duration::from_secs(45),
        "TTL + stale window"
    );
    let other = p
        .invalidation(&as_tenant("POST", "/persons", "globex"))
        .unwrap()
        .invalidation;
    assert_ne!(other.bumps(), write.bumps());
    assert!(p.invalidation(&get("/persons/42")).is_none());
}

#[test]
fn a_write_without_scope_bumps_every_scope_and_purges_nothing() {
    let p = tenant_policy();
    let owed = p
        .invalidation(&Request::patch("/persons/42").body(()).unwrap())
        .unwrap();
    let write = owed.invalidation;
    assert!(write.deletes().is_empty() && !owed.complete);
    assert_eq!(write.bumps()[0].key(), "{app:persons:list}:ver");
    assert_eq!(p.stats().invalidations().unscoped, 1);
    // Cancelled before its handler answered, it bumps no scope's lists:
    // a client without a scope cannot empty every tenant's entries.
    assert!(owed.on_drop.is_some_and(|less| less.is_empty()));
}

#[test]
fn a_scope_that_reads_nothing_bypasses() {
    assert!(matches!(
        tenant_policy().plan(&get("/persons/1")),
        Decision::Bypass {
            reason: Reason::ScopeMissing,
            ..
        }
    ));
}

#[test]
fn percent_encoded_spellings_of_one_param_share_a_key() {
    let p = policy();
    let key = key_of(&p, get("/persons/61"));
    assert_eq!(key_of(&p, get("/persons/%36%31")), key);
    assert_eq!(key_of(&p, get("/persons/6%31")), key);
    assert_ne!(key_of(&p, get("/persons/6%2531")), key);
}

#[test]
fn bad_rules_are_config_errors() {
    let build = |rule: Rule| {
        Policy::builder()
            .route(Route::get("/p/{id}").key("p:{id}"))
            .route(Route::get("/q").key("q:{query_hash}"))
            .route(Route::get("/l").key("l:v{version}").versioned_by("l"))
            .on(rule)
            .build()
            .unwrap_err()
    };
    assert!(matches!(
        build(Rule::new("POST /p")),
        ConfigError::InvalidRule { .. }
    ));
    assert!(matches!(
        build(Rule::new("GET /p").bump("l")),
        ConfigError::InvalidRule { .. }
    ));
    assert!(matches!(
        build(Rule::new("/p").bump("l")),
        ConfigError::InvalidRule { .. }
    ));
    assert!(matches!(
        build(Rule::new("POST /p").bump("l").again_after(Duration::ZERO)),
        ConfigError::InvalidRule { .. }
    ));
    assert!(matches!(
        build(Rule::new("POST /p/{x}").purge("GET /persn/{id}")),
        ConfigError::UnknownRoute { .. }
    ));
    assert!(matches!(
        build(Rule::new("POST /p/{x}").purge("GET /p/{id}")),
        ConfigError::UnboundParam { .. }
    ));
    assert!(matches!(
        build(Rule::new("POST /p/{id}").bump("nope")),
        ConfigError::UnknownGroup { .. }
    ));
    assert!(matches!(
        build(Rule::new("POST /p/{id}").purge("/q")),
        ConfigError::InvalidRule { .. }
    ));
    let dup = Policy::builder()
        .route(Route::get("/l").key("l:v{version}").versioned_by("l"))
        .on(Rule::new("POST /p").bump("l"))
        .on(Rule::new("POST|PUT /p").bump("l"))
        .build()
        .unwrap_err();
    assert!(matches!(dup, ConfigError::DuplicateRoute { .. }));
}

#[test]
fn per_scope_groups_need_one_scope() {
    let other_tenant = || Scope::new().header("x-org");
    let err = Policy::builder()
        .route(
            Route::get("/a")
                .key("a:v{version}")
                .versioned_by("g")
                .per_scope()
                .scope(tenant()),
        )
        .route(
            Route::get("/b")
                .key("b:v{version}")
                .versioned_by("g")
                .per_scope()
                .scope(other_tenant()),
        )
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::GroupScope { .. }), "{err}");
    let err = Policy::builder()
        .route(
            Route::get("/a")
                .key("a:v{version}")
                .versioned_by("g")
                .per_scope(),
        )
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::GroupScope { .. }), "{err}");
}

#[test]
fn unmatched_and_mutating_requests_pass() {
    let p = policy();
    assert!(matches!(p.plan(&get("/other")), Decision::Pass));
    let post = Request::post("/persons/1").body(()).unwrap();
    assert!(matches!(p.plan(&post), Decision::Pass));
}

#[test]
fn credentials_without_scope_bypass() {
    let p = policy();
    for header in ["authorization", "cookie"] {
        let req = Request::get("/persons/1")
            .header(header, "x")
            .body(())
            .unwrap();
        assert!(matches!(
            p.plan(&req),
            Decision::Bypass {
                reason: Reason::Authorization,
                ..
            }
        ));
    }
}

#[test]
fn query_on_a_key_without_query_hash_bypasses() {
    assert!(matches!(
        policy().plan(&get("/persons/1?x=1")),
        Decision::Bypass {
            reason: Reason::Query,
            ..
        }
    ));
    assert!(key_of(&policy(), get("/persons/1?x=")).is_some());
}

#[test]
fn scope_values_are_hashed_not_stored() {
    let p = policy();
    let a = Request::get("/tenants/t/persons/1")
        .header("x-tenant-id", "acme")
        .body(())
        .unwrap();
    let b = Request::get("/tenants/t/persons/1")
        .header("x-tenant-id", "other")
        .body(())
        .unwrap();
    let (ka, kb) = (key_of(&p, a).unwrap(), key_of(&p, b).unwrap());
    assert_ne!(ka, kb);
    assert!(!format!("{ka:?}").contains("acme"));
}

#[test]
fn templates_name_every_param_the_route_matches() {
    let build = |route: Route| Policy::builder().route(route).build();
    let err = build(Route::get("/orgs/{org}/items/{id}").key("item:{id}")).unwrap_err();
    assert_eq!(
        err,
        ConfigError::UnkeyedParam {
            route: "GET /orgs/{org}/items/{id}".to_owned(),
            param: "org".to_owned(),
        }
    );
    assert!(err.to_string().contains("unkeyed_param(\"org\")"), "{err}");
    // Named in the group, or declared on purpose.
    assert!(build(
        Route::get("/orgs/{org}/items")
            .key("items:v{version}:{query_hash}")
            .versioned_by("org:{org}:items")
    )
    .is_ok());
    let declared = build(
        Route::get("/orgs/{org}/items/{id}")
            .key("item:{id}")
            .unkeyed_param("org"),
    )
    .unwrap();
    // Never served for another org: the value is bound into the entry.
    let decide = |uri: &str| match declared.plan(&get(uri)) {
        Decision::Cache { key, binding, .. } => (key, binding),
        _ => panic!("cached"),
    };
    let (x, y) = (decide("/orgs/x/items/1"), decide("/orgs/y/items/1"));
    assert_eq!(x.0, y.0);
    assert_ne!(x.1, y.1);
    assert!(matches!(
        build(Route::get("/a/{id}").key("a:{id}").unkeyed_param("nope")),
        Err(ConfigError::UnknownParam { .. })
    ));
}

#[test]
fn two_values_need_a_separator_and_it_is_escaped_in_them() {
    let build = |template: &str| {
        Policy::builder()
            .route(Route::get("/repos/{o}/{r}").key(template))
            .build()
    };
    for refused in ["repo:{o}{r}", "repo:{o}x{r}", "repo:{o}%{r}"] {
        assert!(
            matches!(build(refused), Err(ConfigError::InvalidKeyTemplate { .. })),
            "{refused}"
        );
    }
    for template in [
        "repo:{o}-{r}",
        "repo:{o}.{r}",
        "repo:{o}_{r}",
        "repo:{o}:{r}",
    ] {
        let policy = build(template).unwrap();
        let key = |uri: &str| policy.key_for(&get(uri)).unwrap();
        assert_ne!(key("/repos/a-b/c"), key("/repos/a/b-c"), "{template}");
        assert_ne!(key("/repos/a.b/c"), key("/repos/a/b.c"), "{template}");
        assert_ne!(key("/repos/a_b/c"), key("/repos/a/b_c"), "{template}");
    }
    // A value's own `-` stays as it is where no separator needs it.
    assert_eq!(
        key_of(&policy(), get("/persons/a-b")),
        Some(CacheKey::Plain("app:person:a-b".into()))
    );
}

#[test]
fn two_routes_with_one_template_never_serve_each_other() {
    let p = Policy::builder()
        .route(Route::get("/users/{id}").key("item:{id}"))
        .route(Route::get("/products/{id}").key("item:{id}"))
        .build()
        .unwrap();
    let decide = |uri: &str| match p.plan(&get(uri)) {
        Decision::Cache { key, binding, .. } => (key, binding),
        _ => panic!("cached"),
    };
    let (user, product) = (decide("/users/1"), decide("/products/1"));
    assert_eq!(user.0, product.0, "one key");
    assert_ne!(user.1, product.1, "bound to its route");
}

#[test]
fn a_response_directive_a_route_names_must_be_one_it_refuses() {
    let err = Policy::builder()
        .route(Route::get("/a").key("a").store_despite(["no-store"]))
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::UnknownDirective { .. }), "{err}");
}

#[test]
fn config_errors_are_typed() {
    let build = |route: Route| Policy::builder().route(route).build().unwrap_err();
    assert!(matches!(
        build(Route::get("/p/{id}").key("p:{nope}")),
        ConfigError::UnknownParam { .. }
    ));
    assert!(matches!(
        build(Route::get("/p/{id}").key("p:{id}").ttl(Duration::ZERO)),
        ConfigError::ZeroTtl { .. }
    ));
    assert!(matches!(
        build(Route::get("/p")),
        ConfigError::MissingKey { .. }
    ));
    assert!(matches!(
        build(Route::get("/p").key("p:v{version}")),
        ConfigError::VersionMismatch { .. }
    ));
    assert!(matches!(
        build(
            Route::get("/p")
                .key("p")
                .scope(Scope::new().header("bad header"))
        ),
        ConfigError::InvalidHeaderName(_)
    ));
    let dup = Policy::builder()
        .route(Route::get("/p").key("a"))
        .route(Route::get("/p").key("b"))
        .build()
        .unwrap_err();
    assert!(matches!(dup, ConfigError::DuplicateRoute { .. }));
    assert!(matches!(
        Policy::builder().namespace("").build().unwrap_err(),
        ConfigError::InvalidNamespace(_)
    ));
    assert!(matches!(
        Policy::builder().max_body_bytes(0).build().unwrap_err(),
        ConfigError::ZeroBodyCap
    ));
}

mod hostile_input {
    //! No two distinct requests map to the same key, whatever they carry;
    //! nothing panics; keys stay short.

    use proptest::prelude::*;

    use super::*;

    const MAX_KEY_LEN: usize = 256;

    fn policy() -> Policy {
        Policy::builder()
            .route(Route::get("/p/{id}").key("person:{id}"))
            .route(Route::get("/l").key("list:{query_hash}"))
            .route(
                Route::get("/t/{id}")
                    .key("t:{id}")
                    .scope(Scope::new().header("x-tenant-id").header("authorization")),
            )
            .build()
            .unwrap()
    }

    /// Percent-encodes every byte outside `[A-Za-z0-9]`, so any string fits a URI.
    fn uri_encode(raw: &str) -> String {
        raw.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn key_of(request: Request<()>) -> String {
        match policy().plan(&request) {
            Decision::Cache { key, .. } => {
                let text = format!("{key:?}");
                assert!(
                    text.len() <= MAX_KEY_LEN + 64,
                    "key too long: {} bytes",
                    text.len()
                );
                text
            }
            _ => panic!("expected a cacheable request"),
        }
    }

    fn param() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9:*{}/%~.\\-_ \n\t]{0,12}",
            any::<String>(),
            Just("1:x".to_owned()),
            Just("*".to_owned()),
            "[a-z]{1}".prop_map(|c| c.repeat(10_000)),
            "[a-z]{1}".prop_map(|c| c.repeat(10_000) + "x"),
        ]
    }

    /// The reference model of normalisation: sorted by name (values of a
    /// repeated name in order), empty values dropped.
    fn normalised(pairs: &[(String, String)]) -> Vec<(String, String)> {
        let mut kept: Vec<_> = pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .cloned()
            .collect();
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        kept
    }

    fn query(pairs: &[(String, String)]) -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Literals a template may put around and between two params.
    fn literal() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[-._:/@x%~]{1,3}",
            Just("-".to_owned()),
            Just("x".to_owned()),
            Just("_v".to_owned()),
        ]
    }

    /// Whether a literal between two params holds a character no encoded
    /// value does (letters, digits, `%`, `~` are in values).
    fn separates(literal: &str) -> bool {
        literal
            .bytes()
            .any(|b| !b.is_ascii_alphanumeric() && b != b'%' && b != b'~')
    }

    proptest! {
        #[test]
        fn two_param_tuples_never_share_a_key(
            (before, between, after, swapped) in (literal(), literal(), literal(), any::<bool>()),
            a in (param(), param()),
            b in (param(), param()),
        ) {
            let (first, second) = if swapped { ("r", "o") } else { ("o", "r") };
            let template = format!("k{before}{{{first}}}{between}{{{second}}}{after}");
            let built = Policy::builder()
                .route(Route::get("/repos/{o}/{r}").key(&template))
                .build();
            // Refused exactly when nothing can separate the two values.
            prop_assert_eq!(built.is_ok(), separates(&between), "{}", template);
            let Ok(policy) = built else { return Ok(()) };
            prop_assume!(![&a.0, &a.1, &b.0, &b.1].iter().any(|v| v.is_empty()));
            let key = |(o, r): &(String, String)| {
                let uri = format!("/repos/{}/{}", uri_encode(o), uri_encode(r));
                policy.key_for(&Request::get(uri).body(()).unwrap())
            };
            let (ka, kb) = (key(&a), key(&b));
            prop_assert!(ka.is_some() && kb.is_some());
            prop_assert_eq!(a == b, ka == kb, "{} {:?} {:?}", template, ka, kb);
        }

        #[test]
        fn distinct_path_params_never_share_a_key(a in param(), b in param()) {
            // An empty segment matches no route: nothing to key.
            prop_assume!(!a.is_empty() && !b.is_empty());
            let ka = key_of(Request::get(format!("/p/{}", uri_encode(&a))).body(()).unwrap());
            let kb = key_of(Request::get(format!("/p/{}", uri_encode(&b))).body(()).unwrap());
            prop_assert_eq!(a == b, ka == kb);
        }

        #[test]
        fn queries_share_a_key_exactly_when_they_normalise_alike(
            a in proptest::collection::vec(("[a-c&=+%]{1,2}", "[x-z&=+%]{0,2}"), 0..5),
            b in proptest::collection::vec(("[a-c&=+%]{1,2}", "[x-z&=+%]{0,2}"), 0..5),
        ) {
            let ka = key_of(Request::get(format!("/l?{}", query(&a))).body(()).unwrap());
            let kb = key_of(Request::get(format!("/l?{}", query(&b))).body(()).unwrap());
            prop_assert_eq!(normalised(&a) == normalised(&b), ka == kb);
        }

        #[test]
        fn distinct_scopes_never_share_a_key(
            a in ("[ -~]{0,20}", proptest::option::weighted(0.9, "[ -~]{0,20}")),
            b in ("[ -~]{0,20}", proptest::option::weighted(0.9, "[ -~]{0,20}")),
        ) {
            let request = |(tenant, auth): &(String, Option<String>)| {
                let mut builder = Request::get("/t/1").header("x-tenant-id", tenant.as_str());
                if let Some(auth) = auth {
                    builder = builder.header("authorization", auth.as_str());
                }
                builder.body(()).unwrap()
            };
            // A scope part that reads nothing (absent or empty) never
            // shares an entry.
            let reads_nothing =
                |side: &(String, Option<String>)| side.0.is_empty() || side.1.as_deref().is_none_or(str::is_empty);
            for side in [&a, &b] {
                if reads_nothing(side) {
                    let bypassed = matches!(
                        policy().plan(&request(side)),
                        Decision::Bypass { reason: Reason::ScopeMissing, .. }
                    );
                    prop_assert!(bypassed);
                }
            }
            prop_assume!(!reads_nothing(&a) && !reads_nothing(&b));
            let (ka, kb) = (key_of(request(&a)), key_of(request(&b)));
            prop_assert_eq!(a == b, ka == kb);
        }

        #[test]
        fn huge_or_odd_queries_never_panic(raw in "[ -~]{0,300}", repeat in 0usize..400) {
            let mut uri = format!("/l?{}", uri_encode(&raw).repeat(repeat.max(1)));
            // `http` refuses URIs of 64 KiB and more before any layer sees them.
            uri.truncate(60_000);
            while uri.ends_with('%') || uri.as_bytes()[uri.len() - 2] == b'%' {
                uri.pop();
            }
            let request = Request::get(uri).body(()).unwrap();
            let _ = key_of(request);
        }
    }

    #[test]
    fn a_60_kb_query_gives_a_short_key() {
        // The largest query `http` accepts (URIs stop short of 64 KiB).
        let uri = format!("/l?q={}", "a".repeat(60_000));
        let _ = key_of(Request::get(uri).body(()).unwrap());
    }
}
