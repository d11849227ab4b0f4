//! Compiling the rules of writes: their methods and pattern checked, each
//! purge and bump resolved to the routes and groups it reaches.

use std::time::Duration;

use http::Method;

use super::compiled::{CompiledRoute, CompiledRule, Group, GroupRef};
use super::Rule;
use crate::error::ConfigError;
use crate::key::served::shape;
use crate::key::{pattern_params, KeyTemplate, Segment};
use crate::routes::validate_pattern;

/// Validates one rule against the routes and groups: its methods, its
/// pattern and its compiled actions.
pub(super) fn compile_rule<'r>(
    rule: &'r Rule,
    routes: &[CompiledRoute],
    groups: &[Group],
    probe_writes: f64,
) -> Result<(Vec<Method>, (CompiledRule, &'r str)), ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidRule {
        rule: rule.route.clone(),
        reason,
    };
    let (method_list, pattern) = rule
        .route
        .split_once(' ')
        .ok_or_else(|| invalid("expected `METHOD /path`".to_owned()))?;
    let pattern = pattern.trim();
    validate_pattern(pattern)?;
    if let Some(reason) = rule_refusal(rule) {
        return Err(invalid(reason.to_owned()));
    }
    let methods = rule_methods(method_list, &invalid)?;
    let params = pattern_params(pattern);
    let bound = |target: &str, template: &KeyTemplate| match template
        .params()
        .find(|p| !params.iter().any(|b| b == p))
    {
        Some(param) => Err(ConfigError::UnboundParam {
            rule: rule.route.clone(),
            target: target.to_owned(),
            param: param.to_owned(),
        }),
        None => Ok(()),
    };
    let mut compiled = CompiledRule {
        shape: shape(pattern),
        purges: Vec::new(),
        bumps: Vec::new(),
        again_after: rule.again_after,
        probe: probe_rate(rule.probe.unwrap_or(probe_writes), &rule.route)?,
    };
    for target in &rule.purges {
        let wanted = target.strip_prefix("GET ").unwrap_or(target).trim();
        let index = routes
            .iter()
            .position(|r| r.pattern == wanted)
            .ok_or_else(|| ConfigError::UnknownRoute {
                rule: rule.route.clone(),
                route: target.clone(),
            })?;
        let route = &routes[index];
        match &route.group {
            // Its entries embed a version: purging them is bumping it.
            Some(group) => {
                bound(target, &group.template)?;
                let template = KeyTemplate::parse(group.template.source(), &params, false)?
                    .typed(&groups[group.index].types);
                compiled.bumps.push(GroupRef {
                    index: group.index,
                    template,
                });
            }
            None if route.key.has(&Segment::QueryHash) => {
                return Err(invalid(format!(
                    "`{target}` is keyed by its query, so no write can name its entries; version it with `versioned_by` and bump the group"
                )));
            }
            None => {
                bound(target, &route.key)?;
                compiled.purges.push(index);
            }
        }
    }
    for name in &rule.bumps {
        compiled
            .bumps
            .push(named_bump(rule, name, &params, groups)?);
    }
    Ok((methods, (compiled, pattern)))
}

/// A probe rate checked: a number from 0 to 1.
pub(super) fn probe_rate(rate: f64, rule: &str) -> Result<f64, ConfigError> {
    match (0.0..=1.0).contains(&rate) {
        true => Ok(rate),
        false => Err(ConfigError::ProbeRate {
            rule: rule.to_owned(),
            rate: rate.to_string(),
        }),
    }
}

/// The version key of group `name` that `rule` bumps, rendered from the
/// rule's params (`params`).
fn named_bump(
    rule: &Rule,
    name: &str,
    params: &[String],
    groups: &[Group],
) -> Result<GroupRef, ConfigError> {
    let index =
        groups
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| ConfigError::UnknownGroup {
                rule: rule.route.clone(),
                group: name.to_owned(),
            })?;
    let template = KeyTemplate::parse(name, params, false)
        .map_err(|err| match err {
            ConfigError::UnknownParam { param, .. } => ConfigError::UnboundParam {
                rule: rule.route.clone(),
                target: name.to_owned(),
                param,
            },
            other => other,
        })?
        .typed(&groups[index].types);
    Ok(GroupRef { index, template })
}

/// The methods of a rule (`PATCH|DELETE`): known, and not safe.
fn rule_methods(
    list: &str,
    invalid: &impl Fn(String) -> ConfigError,
) -> Result<Vec<Method>, ConfigError> {
    let mut methods = Vec::new();
    for method in list.split('|') {
        let method = Method::from_bytes(method.trim().as_bytes())
            .map_err(|_| invalid(format!("unknown method `{method}`")))?;
        if method.is_safe() {
            return Err(invalid(format!(
                "{method} is a safe method: reads do not invalidate"
            )));
        }
        methods.push(method);
    }
    Ok(methods)
}

/// Why a rule cannot work, beside its pattern and methods.
fn rule_refusal(rule: &Rule) -> Option<&'static str> {
    if rule.purges.is_empty() && rule.bumps.is_empty() {
        return Some("no purge or bump");
    }
    if rule.again_after == Some(Duration::ZERO) {
        return Some("again_after(0) would invalidate twice at once; give the lag of the reads");
    }
    None
}
