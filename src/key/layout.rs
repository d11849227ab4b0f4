//! The one owner of the key layout: entry keys, version keys and their
//! hash tags.

use std::time::Duration;

use super::{CacheKey, VersionKey};

/// The one owner of the key layout, used by reads, writes and the operator
/// handle alike:
///
/// - entries: `<ns>:<key>[:scope=<hash>]`, such as `app:person:42`;
/// - version keys: `{<ns>:<group>}:ver`, and for a group versioned per
///   scope also `{<ns>:<group>}:ver:scope=<hash>`;
/// - versioned entries: `{<ns>:<group>}:<before>` + versions joined by
///   `.` + `<after>[:scope=<hash>]`, such as
///   `{app:persons:list}:persons:list:v17:3fa9…`.
///
/// The braces are a Redis Cluster hash tag, derived from the group: a
/// version key and every entry under it hash to one slot, so a lookup reads
/// them with one `MGET` and a write checks them in one script, on a cluster
/// as on one server. Users never write braces (namespaces and templates
/// cannot hold them, parameters are percent-encoded).
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    namespace: String,
}

impl Layout {
    pub(crate) fn new(namespace: String) -> Self {
        Self { namespace }
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// An entry key from a rendered template and a scope suffix.
    pub(crate) fn entry(&self, key: &str, scope: &str) -> String {
        let mut out = String::with_capacity(self.namespace.len() + key.len() + scope.len() + 1);
        out.push_str(&self.namespace);
        out.push(':');
        out.push_str(key);
        out.push_str(scope);
        out
    }

    /// The version key of a rendered group, for every scope (`scope` empty)
    /// or for one.
    pub(crate) fn version(&self, group: &str, scope: &str, ttl: Duration) -> VersionKey {
        // Pushed piece by piece: `format!` costs a list hit more than this.
        let mut key = String::with_capacity(self.namespace.len() + group.len() + scope.len() + 7);
        key.push('{');
        key.push_str(&self.namespace);
        key.push(':');
        key.push_str(group);
        key.push_str("}:ver");
        key.push_str(scope);
        VersionKey::new(key, ttl)
    }

    /// A versioned entry key: the template split at `{version}`, under the
    /// hash tag of its version keys.
    pub(crate) fn versioned(
        &self,
        before: &str,
        after: &str,
        scope: &str,
        versions: Vec<VersionKey>,
    ) -> CacheKey {
        let tag = versions
            .first()
            .and_then(|v| {
                let end = v.key().bytes().position(|b| b == b'}')?;
                v.key().get(..=end)
            })
            .unwrap_or_default();
        let mut prefix = String::with_capacity(tag.len() + before.len() + 1);
        prefix.push_str(tag);
        prefix.push(':');
        prefix.push_str(before);
        let mut suffix = String::with_capacity(after.len() + scope.len());
        suffix.push_str(after);
        suffix.push_str(scope);
        CacheKey::Versioned {
            versions,
            prefix,
            suffix,
        }
    }
}
