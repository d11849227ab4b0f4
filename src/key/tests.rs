//! Templates, encoding, queries, scopes and the layout.

use std::time::Duration;

use super::query::form_decode;
use super::scope::SCOPE_MARK;
use super::template::encode_param;
use super::*;
use crate::reason::Reason;
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
