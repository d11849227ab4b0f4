//! Route confusion: where the application and the cache could see different
//! things (the route axum served, a nested router's prefix, two resources
//! one key template could merge, request parts the handler reads beside the
//! key). Each case sends one odd request, then a clean one on the same
//! resource; the clean one never gets the odd one's page. On the memory
//! store, a real `redis-server` and a real cluster. Each case prints its
//! name and what the clean request got.
//!
//! Run one backend with `cargo test -p tower-redis-cache-tests --test
//! route_confusion memory`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path};
use axum::http::{HeaderMap, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use common::{send, send_reading, Backend};
use tower::ServiceExt;
use tower_redis_cache::store::Store;
use tower_redis_cache::{CacheLayer, ConfigError, Policy, PolicyBuilder, Route, Rule, Scope};

backend_tests!(
    no_clean_request_gets_another_requests_page,
    writes_invalidate_what_the_application_served,
    an_http2_get_body_is_never_reflected_to_another_client,
);

/// One odd request, then a clean one: what the clean one got.
struct Case {
    name: &'static str,
    app: Router,
    odd: Request<Body>,
    clean: fn() -> Request<Body>,
    /// Text only the odd request's page holds.
    odd_mark: &'static str,
    /// Text the clean request's own page holds.
    clean_mark: &'static str,
}

fn policy(store: &Arc<dyn Store>, namespace: &str) -> PolicyBuilder {
    Policy::builder()
        .store(store.clone())
        .namespace(namespace)
        .default_ttl(Duration::from_secs(60))
}

fn json(value: serde_json::Value) -> Response {
    Json(value).into_response()
}

fn req(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

fn cases(store: &Arc<dyn Store>, other_store: &Arc<dyn Store>) -> Vec<Case> {
    let tenant = || Scope::new().header("x-tenant-id");
    let mut cases = Vec::new();

    // `/users/me` beside `/users/{id}`; the policy names `/users/{id}`.
    // The layer on the router, then on the routes only.
    for (namespace, name, route_layer) in [
        ("me", "matched path: /users/me beside /users/{id}", false),
        (
            "me-route-layer",
            "matched path: /users/me beside /users/{id}, route_layer",
            true,
        ),
    ] {
        let users = policy(store, namespace)
            .route(Route::get("/users/{id}").key("user:{id}").scope(tenant()))
            .build()
            .unwrap();
        let app = Router::new()
            .route(
                "/users/me",
                get(|h: HeaderMap| async move {
                    json(serde_json::json!({"me": h["x-user"].to_str().unwrap()}))
                }),
            )
            .route(
                "/users/{id}",
                get(|Path(id): Path<String>| async move { json(serde_json::json!({"id": id})) }),
            );
        let app = match route_layer {
            true => app.route_layer(CacheLayer::new(users)),
            false => app.layer(CacheLayer::new(users)),
        };
        cases.push(Case {
            name,
            app,
            odd: req("/users/me", &[("x-tenant-id", "acme"), ("x-user", "alice")]),
            clean: || req("/users/me", &[("x-tenant-id", "acme"), ("x-user", "bob")]),
            odd_mark: "alice",
            clean_mark: "bob",
        });
    }

    // The cached router nested under `/shops/{shop}`.
    let shops = policy(store, "nest")
        .route(Route::get("/items/{id}").key("item:{id}"))
        .build()
        .unwrap();
    let items = Router::new()
        .route(
            "/items/{id}",
            get(|Path((shop, id)): Path<(String, String)>| async move {
                json(serde_json::json!({"shop": shop, "id": id}))
            }),
        )
        .layer(CacheLayer::new(shops));
    cases.push(Case {
        name: "nested router: /shops/{shop} prefix",
        app: Router::new().nest("/shops/{shop}", items),
        odd: req("/shops/evil/items/1", &[]),
        clean: || req("/shops/good/items/1", &[]),
        odd_mark: "evil",
        clean_mark: "good",
    });

    // One router nested twice.
    let twice = policy(store, "twice")
        .route(Route::get("/items/{id}").key("item:{id}"))
        .build()
        .unwrap();
    let api = Router::new()
        .route(
            "/items/{id}",
            get(|OriginalUri(uri): OriginalUri| async move {
                json(serde_json::json!({"self": uri.path()}))
            }),
        )
        .layer(CacheLayer::new(twice));
    cases.push(Case {
        name: "nested router: one router under /v1 and /v2",
        app: Router::new().nest("/v1", api.clone()).nest("/v2", api),
        odd: req("/v1/items/1", &[]),
        clean: || req("/v2/items/1", &[]),
        odd_mark: "/v1/",
        clean_mark: "/v2/",
    });

    // Two params with a separator a value can hold.
    let repos = policy(store, "repos")
        .route(Route::get("/repos/{o}/{r}").key("repo:{o}-{r}"))
        .build()
        .unwrap();
    cases.push(Case {
        name: "template: repo:{o}-{r}",
        app: Router::new()
            .route(
                "/repos/{o}/{r}",
                get(|Path((o, r)): Path<(String, String)>| async move {
                    json(serde_json::json!({"repo": format!("{o}/{r}")}))
                }),
            )
            .layer(CacheLayer::new(repos)),
        odd: req("/repos/a-b/c", &[]),
        clean: || req("/repos/a/b-c", &[]),
        odd_mark: "a-b/c",
        clean_mark: "a/b-c",
    });

    // A path param the key leaves out, on purpose.
    let orgs = policy(store, "orgs")
        .route(
            Route::get("/orgs/{org}/items/{id}")
                .key("item:{id}")
                .unkeyed_param("org"),
        )
        .build()
        .unwrap();
    cases.push(Case {
        name: "template: a param declared unkeyed",
        app: Router::new()
            .route(
                "/orgs/{org}/items/{id}",
                get(|Path((org, id)): Path<(String, String)>| async move {
                    json(serde_json::json!({"org": org, "id": id}))
                }),
            )
            .layer(CacheLayer::new(orgs)),
        odd: req("/orgs/xorg/items/1", &[]),
        clean: || req("/orgs/yorg/items/1", &[]),
        odd_mark: "xorg",
        clean_mark: "yorg",
    });

    // Two routes with one template.
    let shared = policy(store, "shared")
        .route(Route::get("/users/{id}").key("item:{id}"))
        .route(Route::get("/products/{id}").key("item:{id}"))
        .build()
        .unwrap();
    cases.push(Case {
        name: "template: two routes keyed item:{id}",
        app: Router::new()
            .route(
                "/users/{id}",
                get(|| async { json(serde_json::json!({"kind": "user"})) }),
            )
            .route(
                "/products/{id}",
                get(|| async { json(serde_json::json!({"kind": "product"})) }),
            )
            .layer(CacheLayer::new(shared)),
        odd: req("/users/1", &[]),
        clean: || req("/products/1", &[]),
        odd_mark: "user",
        clean_mark: "product",
    });

    // Two services on one store, one namespace (the default), one template.
    let service_a = Router::new()
        .route(
            "/a/{id}",
            get(|| async { json(serde_json::json!({"service": "alpha"})) }),
        )
        .layer(CacheLayer::new(
            Policy::builder()
                .store(other_store.clone())
                .route(Route::get("/a/{id}").key("item:{id}"))
                .build()
                .unwrap(),
        ));
    let service_b = Router::new()
        .route(
            "/b/{id}",
            get(|| async { json(serde_json::json!({"service": "beta"})) }),
        )
        .layer(CacheLayer::new(
            Policy::builder()
                .store(store.clone())
                .route(Route::get("/b/{id}").key("item:{id}"))
                .build()
                .unwrap(),
        ));
    cases.push(Case {
        name: "two services on one store and namespace",
        app: Router::new().merge(service_a).merge(service_b),
        odd: req("/a/1", &[]),
        clean: || req("/b/1", &[]),
        odd_mark: "alpha",
        clean_mark: "beta",
    });

    // A GET body with no Content-Length, read by the handler.
    let echo = policy(store, "body")
        .route(Route::get("/echo/{id}").key("echo:{id}"))
        .build()
        .unwrap();
    let chunks =
        futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"evil-body"))]);
    cases.push(Case {
        name: "GET body without Content-Length",
        app: Router::new()
            .route(
                "/echo/{id}",
                get(|body: Bytes| async move {
                    let body = String::from_utf8_lossy(&body).into_owned();
                    json(serde_json::json!({"body": body, "clean": body.is_empty()}))
                }),
            )
            .layer(CacheLayer::new(echo)),
        odd: Request::get("/echo/1")
            .body(Body::from_stream(chunks))
            .unwrap(),
        clean: || req("/echo/1", &[]),
        odd_mark: "evil-body",
        clean_mark: "\"clean\":true",
    });

    // `OriginalUri` reflected; the allowlist strips a param.
    let search = policy(store, "uri")
        .route(
            Route::get("/search")
                .key("search:{query_hash}")
                .query_allowlist(["q"]),
        )
        .build()
        .unwrap();
    cases.push(Case {
        name: "OriginalUri reflected, the allowlist strips a param",
        app: Router::new()
            .route(
                "/search",
                get(|OriginalUri(uri): OriginalUri| async move {
                    json(serde_json::json!({"self": uri.to_string(), "clean": true}))
                }),
            )
            .layer(CacheLayer::new(search)),
        odd: req("/search?q=1&callback=evil", &[]),
        clean: || req("/search?q=1", &[]),
        odd_mark: "evil",
        clean_mark: "\"clean\":true",
    });

    // Scoped by host only; the handler reads the cookie.
    let hosts = policy(store, "cookie")
        .route(
            Route::get("/page/{id}")
                .key("page:{id}")
                .scope(Scope::new().host()),
        )
        .build()
        .unwrap();
    cases.push(Case {
        name: "host scope, the handler reads Cookie",
        app: Router::new()
            .route(
                "/page/{id}",
                get(|h: HeaderMap| async move {
                    let cookie = h.get("cookie").map(|c| c.to_str().unwrap().to_owned());
                    json(serde_json::json!({"session": cookie.unwrap_or_else(|| "anonymous".into())}))
                }),
            )
            .layer(CacheLayer::new(hosts)),
        odd: req("/page/1", &[("host", "a.example"), ("cookie", "session=evil")]),
        clean: || req("/page/1", &[("host", "a.example")]),
        odd_mark: "evil",
        clean_mark: "anonymous",
    });

    // An absolute-form request URI whose scheme the handler reflects.
    let absolute = policy(store, "abs")
        .route(Route::get("/abs/{id}").key("abs:{id}"))
        .build()
        .unwrap();
    cases.push(Case {
        name: "absolute-form URI, the handler reflects its scheme",
        app: Router::new()
            .route(
                "/abs/{id}",
                get(|uri: Uri| async move {
                    let scheme = uri.scheme_str().unwrap_or("none").to_owned();
                    json(serde_json::json!({"scheme": scheme}))
                }),
            )
            .layer(CacheLayer::new(absolute)),
        odd: req("gopher://a.example/abs/1", &[("host", "a.example")]),
        clean: || req("/abs/1", &[("host", "a.example")]),
        odd_mark: "gopher",
        clean_mark: "none",
    });

    // A header the route varies on, differing only in case.
    let vary = policy(store, "vary")
        .route(
            Route::get("/cors/{id}")
                .key("cors:{id}")
                .vary_by(["origin"]),
        )
        .build()
        .unwrap();
    cases.push(Case {
        name: "vary_by origin, values differing in case",
        app: Router::new()
            .route(
                "/cors/{id}",
                get(|h: HeaderMap| async move {
                    let origin = h["origin"].to_str().unwrap().to_owned();
                    let mut response = json(serde_json::json!({"origin": origin}));
                    response
                        .headers_mut()
                        .insert("vary", "origin".parse().unwrap());
                    response
                }),
            )
            .layer(CacheLayer::new(vary)),
        odd: req("/cors/1", &[("origin", "https://EVIL.example")]),
        clean: || req("/cors/1", &[("origin", "https://evil.example")]),
        odd_mark: "EVIL",
        clean_mark: "https://evil.example",
    });

    // A scope header sent twice.
    let doubled = policy(store, "twice-header")
        .route(Route::get("/t/{id}").key("t:{id}").scope(tenant()))
        .build()
        .unwrap();
    let mut odd = req("/t/1", &[("x-tenant-id", "")]);
    odd.headers_mut()
        .append("x-tenant-id", "acme".parse().unwrap());
    cases.push(Case {
        name: "scope header sent twice",
        app: Router::new()
            .route(
                "/t/{id}",
                get(|h: HeaderMap| async move {
                    let all: Vec<_> = h
                        .get_all("x-tenant-id")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_owned())
                        .collect();
                    // Reads the first value, as many handlers do.
                    json(serde_json::json!({"tenant": all[0], "count": all.len()}))
                }),
            )
            .layer(CacheLayer::new(doubled)),
        odd,
        clean: || req("/t/1", &[("x-tenant-id", "acme")]),
        odd_mark: "\"count\":2",
        clean_mark: "\"count\":1",
    });

    cases
}

async fn no_clean_request_gets_another_requests_page(backend: Backend) {
    let other = backend.another_store();
    let mut confused = Vec::new();
    let all = cases(&backend.store, &other);
    let count = all.len();
    for case in all {
        let (odd_status, odd_cache, odd_body) = send(&case.app, case.odd).await;
        assert_eq!(odd_status, StatusCode::OK, "{}: {odd_body}", case.name);
        // Twice: the clean request's second read may be a hit of its own.
        let mut got = Vec::new();
        for _ in 0..2 {
            let (status, x_cache, body) = send(&case.app, (case.clean)()).await;
            assert_eq!(status, StatusCode::OK, "{}: {body}", case.name);
            got.push((x_cache, body));
        }
        println!(
            "{}: odd {odd_cache}, clean {} then {}: {}",
            case.name, got[0].0, got[1].0, got[0].1
        );
        let foreign = got
            .iter()
            .any(|(_, body)| body.contains(case.odd_mark) || !body.contains(case.clean_mark));
        if foreign {
            confused.push(case.name);
        }
    }
    println!(
        "{} of {count} clean requests got another request's page",
        confused.len()
    );
    assert!(
        confused.is_empty(),
        "served another request's page: {confused:?}"
    );

    // A template that leaves out a path param is refused at build.
    let refused = Policy::builder()
        .route(Route::get("/orgs/{org}/items/{id}").key("item:{id}"))
        .build()
        .unwrap_err();
    assert!(
        matches!(refused, ConfigError::UnkeyedParam { .. }),
        "{refused}"
    );
}

async fn writes_invalidate_what_the_application_served(backend: Backend) {
    let store = backend.store.clone();
    let reads = Arc::new(AtomicUsize::new(0));
    let tenant = Scope::new().header("x-tenant-id");
    let policy = policy(&store, "writes")
        .route(Route::get("/notes/{id}").key("note:{id}"))
        .route(
            Route::get("/notes")
                .key("notes:v{version}:{query_hash}")
                .versioned_by("notes")
                .per_scope()
                .scope(tenant.clone()),
        )
        .route(Route::get("/fresh/{id}").key("fresh:{id}"))
        .on(Rule::new("POST /notes/{id}").purge("GET /notes/{id}"))
        .on(Rule::new("PATCH /notes/{id}").purge("GET /notes/{id}"))
        .on(Rule::new("POST /notes").bump("notes"))
        .build()
        .unwrap();
    let counted = reads.clone();
    let app = Router::new()
        .route(
            "/notes/{id}",
            get(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move { json(serde_json::json!({"read": n})) }
            })
            // Post/redirect/get: the write answers 303.
            .post(|| async {
                Response::builder()
                    .status(StatusCode::SEE_OTHER)
                    .header("location", "/notes/1")
                    .body(Body::empty())
                    .unwrap()
            })
            .patch(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/notes/bulk", patch(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/notes",
            get(|h: HeaderMap| async move {
                json(serde_json::json!({"tenant": h["x-tenant-id"].to_str().unwrap()}))
            })
            .post(|h: HeaderMap| async move {
                // Answers 401 without a tenant, slowly: the client gives up.
                tokio::time::sleep(Duration::from_millis(200)).await;
                match h.contains_key("x-tenant-id") {
                    true => StatusCode::CREATED,
                    false => StatusCode::UNAUTHORIZED,
                }
            }),
        )
        .route(
            "/fresh/{id}",
            get(|| async {
                let mut response = json(serde_json::json!({"fresh": true}));
                response
                    .headers_mut()
                    .insert("cache-control", "max-age=0".parse().unwrap());
                response
            }),
        )
        .layer(CacheLayer::new(policy));

    // A 303 after a POST invalidates like a 2xx.
    send(&app, req("/notes/1", &[])).await;
    assert_eq!(send(&app, req("/notes/1", &[])).await.1, "HIT");
    let (status, status_header, _) = send_reading(
        &app,
        Request::post("/notes/1").body(Body::empty()).unwrap(),
        "cache-status",
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(status_header.contains("invalidated"), "{status_header}");
    assert_eq!(send(&app, req("/notes/1", &[])).await.1, "MISS");

    // `PATCH /notes/bulk` served by its own handler is not
    // `PATCH /notes/{id}`: it invalidates nothing.
    let (_, status_header, _) = send_reading(
        &app,
        Request::patch("/notes/bulk").body(Body::empty()).unwrap(),
        "cache-status",
    )
    .await;
    assert_eq!(status_header, "", "no invalidation");
    assert_eq!(send(&app, req("/notes/1", &[])).await.1, "HIT");

    // A response that says `max-age=0` is not stored.
    let (_, status_header, _) = send_reading(&app, req("/fresh/1", &[]), "cache-status").await;
    assert!(
        status_header.contains("detail=cache-control"),
        "{status_header}"
    );
    assert_eq!(send(&app, req("/fresh/1", &[])).await.1, "MISS");

    // Ten anonymous writes cancelled while their handler runs: the
    // tenants' warm lists stay warm.
    let tenants = ["acme", "globex"];
    for tenant in tenants {
        send(&app, req("/notes", &[("x-tenant-id", tenant)])).await;
        assert_eq!(
            send(&app, req("/notes", &[("x-tenant-id", tenant)]))
                .await
                .1,
            "HIT"
        );
    }
    for _ in 0..10 {
        let write = app
            .clone()
            .oneshot(Request::post("/notes").body(Body::empty()).unwrap());
        assert!(tokio::time::timeout(Duration::from_millis(20), write)
            .await
            .is_err());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut warm = 0;
    for tenant in tenants {
        if send(&app, req("/notes", &[("x-tenant-id", tenant)]))
            .await
            .1
            == "HIT"
        {
            warm += 1;
        }
    }
    println!("warm tenant lists left as HITs after 10 cancelled anonymous writes: {warm} of 2");
    assert_eq!(warm, 2);

    // A tenant's committed write whose future is dropped still bumps its
    // lists.
    let write = app.clone().oneshot(
        Request::post("/notes")
            .header("x-tenant-id", "acme")
            .body(Body::empty())
            .unwrap(),
    );
    assert!(tokio::time::timeout(Duration::from_millis(20), write)
        .await
        .is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send(&app, req("/notes", &[("x-tenant-id", "acme")]))
            .await
            .1,
        "MISS"
    );
    assert_eq!(
        send(&app, req("/notes", &[("x-tenant-id", "globex")]))
            .await
            .1,
        "HIT"
    );
}

/// A GET whose body comes as HTTP/2 DATA frames, with no `Content-Length`,
/// over a real server and client: it bypasses, and a clean client gets its
/// own page.
async fn an_http2_get_body_is_never_reflected_to_another_client(backend: Backend) {
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let policy = policy(&backend.store, "h2")
        .route(Route::get("/echo/{id}").key("echo:{id}"))
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/echo/{id}",
            get(|body: Bytes| async move {
                let body = String::from_utf8_lossy(&body).into_owned();
                json(serde_json::json!({"body": body}))
            }),
        )
        .layer(CacheLayer::new(policy));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>();
    let send = |body: Option<&'static str>| {
        let client = client.clone();
        async move {
            let body = match body {
                Some(text) => {
                    let frames = futures_util::stream::iter([Ok::<_, std::io::Error>(
                        http_body::Frame::data(Bytes::from_static(text.as_bytes())),
                    )]);
                    StreamBody::new(frames).boxed()
                }
                None => Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            };
            let request = Request::get(format!("http://{addr}/echo/1"))
                .body(body)
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.version(), axum::http::Version::HTTP_2);
            let x_cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (x_cache, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let odd = send(Some("evil-frames")).await;
    assert_eq!(
        odd,
        ("BYPASS".to_owned(), r#"{"body":"evil-frames"}"#.to_owned())
    );
    let clean = [send(None).await, send(None).await];
    println!("HTTP/2 GET with DATA frames: odd {odd:?}, clean {clean:?}");
    assert_eq!(
        clean,
        [
            ("MISS".to_owned(), r#"{"body":""}"#.to_owned()),
            ("HIT".to_owned(), r#"{"body":""}"#.to_owned()),
        ]
    );
}
