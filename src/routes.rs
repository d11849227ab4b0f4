//! Method + path-pattern tables, matched the way axum matches (matchit), so
//! the layers work in any tower stack.

use std::collections::HashMap;

use http::Method;

use crate::error::ConfigError;
use crate::key::Params;

/// Maps (method, path pattern) to an index into the caller's own list.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    router: matchit::Router<usize>,
    slots: Vec<Vec<(Method, usize)>>,
    by_pattern: HashMap<String, usize>,
}

impl RouteTable {
    pub(crate) fn insert(
        &mut self,
        method: &Method,
        pattern: &str,
        index: usize,
    ) -> Result<(), ConfigError> {
        let slot = match self.by_pattern.get(pattern) {
            Some(&slot) => slot,
            None => {
                let slot = self.slots.len();
                self.router
                    .insert(pattern, slot)
                    .map_err(|err| ConfigError::InvalidPattern {
                        pattern: pattern.to_owned(),
                        reason: err.to_string(),
                    })?;
                self.slots.push(Vec::new());
                self.by_pattern.insert(pattern.to_owned(), slot);
                slot
            }
        };
        let methods = &mut self.slots[slot];
        if methods.iter().any(|(m, _)| m == method) {
            return Err(ConfigError::DuplicateRoute {
                route: format!("{method} {pattern}"),
            });
        }
        methods.push((method.clone(), index));
        Ok(())
    }

    /// The index registered for `method` at `path`, with the bound params.
    pub(crate) fn at<'p>(&'p self, method: &Method, path: &'p str) -> Option<(usize, Params<'p>)> {
        let found = self.router.at(path).ok()?;
        let index = self.slots[*found.value]
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, index)| *index)?;
        Some((index, Params::from_matchit(&found.params)))
    }
}

pub(crate) fn validate_pattern(pattern: &str) -> Result<(), ConfigError> {
    if !pattern.starts_with('/') {
        return Err(ConfigError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason: "must start with `/`".to_owned(),
        });
    }
    Ok(())
}
