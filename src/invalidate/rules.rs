use std::sync::Arc;

use http::{Method, Request};

use crate::entry;
use crate::error::{validate_namespace, ConfigError};
use crate::key::{pattern_params, KeyTemplate, Params, Rendered, Scope};
use crate::policy::version_key;
use crate::routes::{validate_pattern, RouteTable};
use crate::store::Invalidation;

/// One mutating route and what it invalidates.
///
/// ```
/// use tower_redis_cache::{Rule, Scope};
///
/// let rule = Rule::new("PATCH|DELETE /persons/{id}")
///     .delete("person:{id}")
///     .bump("persons:list")
///     .scope(Scope::new().header("x-tenant-id"));
/// # let _ = rule;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Rule {
    route: String,
    deletes: Vec<String>,
    bumps: Vec<String>,
    scope: Scope,
}

impl Rule {
    /// A rule for `METHOD[|METHOD…] /path/{pattern}`, such as
    /// `POST /persons` or `PATCH|DELETE /persons/{id}`.
    pub fn new(route: &str) -> Self {
        Self {
            route: route.to_owned(),
            deletes: Vec::new(),
            bumps: Vec::new(),
            scope: Scope::new(),
        }
    }

    /// Deletes the entry with this key template (the same template as the
    /// cached route's key, path params by name).
    pub fn delete(mut self, template: &str) -> Self {
        self.deletes.push(template.to_owned());
        self
    }

    /// Bumps the version of this group (see
    /// [`Route::versioned_by`](crate::Route::versioned_by)).
    pub fn bump(mut self, group: &str) -> Self {
        self.bumps.push(group.to_owned());
        self
    }

    /// The scope of the deleted keys; it must match the cached route's.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }
}

#[derive(Debug)]
struct CompiledRule {
    deletes: Vec<KeyTemplate>,
    bumps: Vec<KeyTemplate>,
    scope: Scope,
}

/// A validated set of [`Rule`]s, built with [`Rules::builder`].
#[derive(Debug, Clone)]
pub struct Rules {
    inner: Arc<RulesInner>,
}

#[derive(Debug)]
struct RulesInner {
    namespace: String,
    rules: Vec<CompiledRule>,
    table: RouteTable,
}

/// Builds [`Rules`].
#[derive(Debug)]
#[must_use]
pub struct RulesBuilder {
    namespace: String,
    rules: Vec<Rule>,
}

impl Rules {
    /// A builder with namespace `app` (use the policy's).
    pub fn builder() -> RulesBuilder {
        RulesBuilder {
            namespace: "app".to_owned(),
            rules: Vec::new(),
        }
    }

    /// What a successful `request` must invalidate, if it matches a rule.
    pub(crate) fn invalidation<B>(&self, request: &Request<B>) -> Option<Invalidation> {
        let (index, params) = self
            .inner
            .table
            .at(request.method(), request.uri().path())?;
        let rule = &self.inner.rules[index];
        let ns = &self.inner.namespace;
        let render = |template: &KeyTemplate, params: &Params<'_>| match template.render(params, "")
        {
            Rendered::Whole(key) | Rendered::Split(key, _) => key,
        };
        let scope = rule
            .scope
            .key_suffix(request.headers(), request.extensions());
        Some(Invalidation {
            deletes: rule
                .deletes
                .iter()
                .map(|t| format!("{ns}:{}{scope}", render(t, &params)))
                .collect(),
            bumps: rule
                .bumps
                .iter()
                .map(|t| version_key(ns, &render(t, &params)))
                .collect(),
            tombstone: entry::tombstone(),
        })
    }
}

/// `del app:person:42, incr app:persons:list:ver`, for logs; formatted
/// only if an event is emitted.
pub(crate) struct Actions<'a>(pub(crate) &'a Invalidation);

impl std::fmt::Display for Actions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let deletes = self.0.deletes.iter().map(|k| ("del", k));
        let bumps = self.0.bumps.iter().map(|k| ("incr", k));
        for (i, (verb, key)) in deletes.chain(bumps).enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{verb} {key}")?;
        }
        Ok(())
    }
}

impl RulesBuilder {
    /// The namespace of the keys (default `app`); use the policy's.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self
    }

    /// Adds a rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Validates every rule and builds the set.
    pub fn build(self) -> Result<Rules, ConfigError> {
        validate_namespace(&self.namespace)?;
        let mut table = RouteTable::default();
        let mut rules = Vec::with_capacity(self.rules.len());
        for (index, rule) in self.rules.into_iter().enumerate() {
            let invalid = |reason: &str| ConfigError::InvalidRule {
                rule: rule.route.clone(),
                reason: reason.to_owned(),
            };
            let (methods, pattern) = rule
                .route
                .split_once(' ')
                .ok_or_else(|| invalid("expected `METHOD /path`"))?;
            let pattern = pattern.trim();
            validate_pattern(pattern)?;
            rule.scope.validate()?;
            if rule.deletes.is_empty() && rule.bumps.is_empty() {
                return Err(invalid("no delete or bump"));
            }
            let params = pattern_params(pattern);
            let parse = |t: &String| KeyTemplate::parse(t, &params, false);
            let deletes = rule.deletes.iter().map(parse).collect::<Result<_, _>>()?;
            let bumps = rule.bumps.iter().map(parse).collect::<Result<_, _>>()?;
            for method in methods.split('|') {
                let method = Method::from_bytes(method.trim().as_bytes())
                    .map_err(|_| invalid("unknown method"))?;
                if method.is_safe() {
                    return Err(invalid("safe methods (GET, HEAD…) do not invalidate"));
                }
                table.insert(&method, pattern, index)?;
            }
            rules.push(CompiledRule {
                deletes,
                bumps,
                scope: rule.scope,
            });
        }
        Ok(Rules {
            inner: Arc::new(RulesInner {
                namespace: self.namespace,
                rules,
                table,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::builder()
            .rule(Rule::new("POST /persons").bump("persons:list"))
            .rule(
                Rule::new("PATCH|DELETE /persons/{id}")
                    .delete("person:{id}")
                    .bump("persons:list"),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn renders_the_seed_actions() {
        let req = Request::patch("/persons/42").body(()).unwrap();
        let inv = rules().invalidation(&req).unwrap();
        assert_eq!(inv.deletes, vec!["app:person:42"]);
        assert_eq!(inv.bumps, vec!["app:persons:list:ver"]);
        let post = Request::post("/persons").body(()).unwrap();
        assert_eq!(
            rules().invalidation(&post).unwrap().bumps,
            vec!["app:persons:list:ver"]
        );
        let get = Request::get("/persons/42").body(()).unwrap();
        assert!(rules().invalidation(&get).is_none());
    }

    #[test]
    fn bad_rules_are_config_errors() {
        let build = |rule: Rule| Rules::builder().rule(rule).build().unwrap_err();
        assert!(matches!(
            build(Rule::new("POST /p")),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("GET /p").bump("g")),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("/p").bump("g")),
            ConfigError::InvalidRule { .. }
        ));
        assert!(matches!(
            build(Rule::new("POST /p/{id}").delete("p:{x}")),
            ConfigError::UnknownParam { .. }
        ));
        let dup = Rules::builder()
            .rule(Rule::new("POST /p").bump("a"))
            .rule(Rule::new("POST|PUT /p").bump("b"))
            .build()
            .unwrap_err();
        assert!(matches!(dup, ConfigError::DuplicateRoute { .. }));
    }
}
