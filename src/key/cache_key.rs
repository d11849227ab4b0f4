//! The keys a request maps to: an entry key, plain or built from the
//! current values of its version keys.

use std::time::Duration;

/// A version key and how long it must live: at least as long as the longest
/// entry it guards (TTL plus stale window), so it never expires under a live
/// entry. A missing version key restarts above any value it had, so expiry
/// is safe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VersionKey {
    key: String,
    ttl: Duration,
}

impl VersionKey {
    pub(crate) fn new(key: String, ttl: Duration) -> Self {
        Self { key, ttl }
    }

    /// The key, such as `{app:persons:list}:ver`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How long the key lives after the last entry stored under it.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The key of one cache entry, with the namespace and scope already applied.
/// Minted by the [`Policy`](crate::Policy); stores read it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheKey {
    /// A key used as is, such as `app:person:42`.
    Plain(String),
    /// A key that embeds the current values of its version keys:
    /// `prefix + v1[.v2] + suffix`, such as `app:persons:list:v` + `17` + `:3fa9…`.
    /// A group versioned per scope has two version keys: the group's (bumped
    /// for every scope at once) and the scope's own.
    Versioned {
        /// The version keys, such as `{app:persons:list}:ver`.
        versions: Vec<VersionKey>,
        /// The entry key before the versions.
        prefix: String,
        /// The entry key after the versions.
        suffix: String,
    },
}

impl CacheKey {
    /// The entry key for the values of the version keys, in order (a plain
    /// key ignores them).
    pub fn entry_key(&self, versions: &[&[u8]]) -> String {
        let mut key = Vec::with_capacity(self.entry_key_len());
        let _ = self.write_entry_key(versions.iter().copied(), &mut key);
        String::from_utf8(key)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    fn entry_key_len(&self) -> usize {
        match self {
            Self::Plain(key) => key.len(),
            Self::Versioned { prefix, suffix, .. } => prefix.len() + suffix.len() + 40,
        }
    }

    /// Writes [`entry_key`](Self::entry_key) into `out`, without a string
    /// of its own (the Redis store writes it straight into its command).
    pub(crate) fn write_entry_key<'a>(
        &self,
        versions: impl Iterator<Item = &'a [u8]>,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        match self {
            Self::Plain(key) => out.write_all(key.as_bytes()),
            Self::Versioned { prefix, suffix, .. } => {
                out.write_all(prefix.as_bytes())?;
                for (i, version) in versions.enumerate() {
                    if i > 0 {
                        out.write_all(b".")?;
                    }
                    out.write_all(version)?;
                }
                out.write_all(suffix.as_bytes())
            }
        }
    }

    /// The version keys (none for a plain key).
    pub fn versions(&self) -> &[VersionKey] {
        match self {
            Self::Plain(_) => &[],
            Self::Versioned { versions, .. } => versions,
        }
    }
}
