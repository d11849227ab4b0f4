//! The policy's one seam for the in-process tier (feature `tier`): the
//! tier's bounds, and the store wrapped in the tier when a route keeps
//! entries in process. Without the feature, nothing is kept and every call
//! here is a no-op.

use std::sync::Arc;

use crate::error::ConfigError;
use crate::store::Store;

/// The bounds of the tier the routes share.
#[cfg(feature = "tier")]
pub(super) type Bounds = crate::store::tier::InProcess;

/// Without the feature: no tier, no bounds.
#[cfg(not(feature = "tier"))]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Bounds(());

/// The tier a policy holds, if a route keeps entries in process.
#[derive(Default)]
pub(super) struct Attached {
    #[cfg(feature = "tier")]
    tier: Option<crate::store::tier::Tier>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached").finish_non_exhaustive()
    }
}

/// `store`, behind a tier of `bounds` when `wanted` (a route keeps its
/// entries in process).
#[cfg(feature = "tier")]
pub(super) fn attach(
    store: Arc<dyn Store>,
    bounds: Bounds,
    wanted: bool,
) -> Result<(Arc<dyn Store>, Attached), ConfigError> {
    if !wanted {
        return Ok((store, Attached::default()));
    }
    let (store, tier) = tiered(store, bounds)?;
    Ok((store, Attached { tier: Some(tier) }))
}

/// Without the feature: `store` as it is.
#[cfg(not(feature = "tier"))]
pub(super) fn attach(
    store: Arc<dyn Store>,
    _: Bounds,
    _: bool,
) -> Result<(Arc<dyn Store>, Attached), ConfigError> {
    Ok((store, Attached::default()))
}

#[cfg(feature = "tier")]
impl super::Policy {
    /// The in-process tier, when a route keeps entries there.
    pub(crate) fn tier(&self) -> Option<&crate::store::tier::Tier> {
        self.inner.tier.tier.as_ref()
    }

    /// The tier's state, when a route keeps entries there.
    pub(crate) fn in_process_health(&self) -> Option<crate::InProcessHealth> {
        self.tier().map(|tier| crate::InProcessHealth {
            live: tier.is_live(),
            entries: tier.len(),
        })
    }
}

#[cfg(not(feature = "tier"))]
impl super::Policy {
    /// Without the feature: no tier.
    pub(crate) fn in_process_health(&self) -> Option<crate::InProcessHealth> {
        None
    }
}

#[cfg(feature = "tier")]
/// `store` behind an in-process tier of `bounds`, which the store tells of
/// every invalidation.
fn tiered(
    store: Arc<dyn Store>,
    bounds: Bounds,
) -> Result<(Arc<dyn Store>, crate::store::tier::Tier), ConfigError> {
    if bounds.is_empty() {
        return Err(ConfigError::InProcess {
            reason: "the in-process tier holds no entry or no byte".to_owned(),
        });
    }
    let tier = crate::store::tier::Tier::new(bounds);
    if !tier.watch(&*store) {
        return Err(ConfigError::InProcess {
            reason: format!(
                "the {} store does not report invalidations (a RedisStore over its own connection needs `subscribe_via`, and a channel)",
                store.name()
            ),
        });
    }
    let store: Arc<dyn Store> = Arc::new(crate::store::tier::Tiered {
        inner: store,
        tier: tier.clone(),
    });
    Ok((store, tier))
}
