//! Values built once per configuration `Arc` and kept while that configuration lives: the
//! TLS acceptor, the DKIM signers, the SPF/DKIM/DMARC checker. A `SIGHUP` reload brings a
//! new `Arc` and so a fresh build; sessions of the configuration before it keep theirs.
//! Reads no file itself: what is built, and from what, is the caller's business.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::Config;

/// One value per live configuration; entries of configurations nobody holds any more are
/// dropped on the next use.
pub struct PerConfig<T>(Mutex<Vec<(Weak<Config>, T)>>);

impl<T: Clone> Default for PerConfig<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> PerConfig<T> {
    /// An empty cache (for a `static`).
    pub const fn new() -> Self {
        PerConfig(Mutex::new(Vec::new()))
    }

    /// The value kept for `config`, else what `build` makes (kept only when it is `Ok`).
    /// The cache stays locked while `build` runs, so two sessions never build twice.
    pub fn get_or_try_build<E>(
        &self, config: &Arc<Config>, build: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut live = self.live();
        if let Some((_, value)) = live
            .iter()
            .find(|(weak, _)| std::ptr::eq(weak.as_ptr(), &**config))
        {
            return Ok(value.clone());
        }
        let value = build()?;
        live.push((Arc::downgrade(config), value.clone()));
        Ok(value)
    }

    /// The value kept for `config`, else what `build` makes, which is kept.
    pub fn get_or_build(&self, config: &Arc<Config>, build: impl FnOnce() -> T) -> T {
        match self.get_or_try_build(config, || Ok::<T, std::convert::Infallible>(build())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// Keeps `value` as `config`'s, in place of any value kept before.
    pub fn insert(&self, config: &Arc<Config>, value: T) {
        let mut live = self.live();
        live.retain(|(weak, _)| !std::ptr::eq(weak.as_ptr(), &**config));
        live.push((Arc::downgrade(config), value));
    }

    /// The entries of configurations still held. A poisoned lock only means another
    /// session panicked mid-build; the entries are still valid, so keep using them.
    fn live(&self) -> MutexGuard<'_, Vec<(Weak<Config>, T)>> {
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(weak, _)| weak.strong_count() > 0);
        cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_once_per_configuration_and_errors_not_kept() {
        let cache = PerConfig::<u32>::new();
        let (a, b) = (Arc::new(Config::default()), Arc::new(Config::default()));
        assert_eq!(cache.get_or_build(&a, || 1), 1);
        assert_eq!(cache.get_or_build(&a, || 2), 1);
        assert_eq!(
            cache.get_or_try_build(&b, || Err::<u32, _>("no")),
            Err("no")
        );
        assert_eq!(cache.get_or_try_build(&b, || Ok::<_, ()>(3)), Ok(3));
        cache.insert(&a, 4);
        assert_eq!(cache.get_or_build(&a, || 5), 4);
        drop(a);
        assert_eq!(cache.live().len(), 1);
    }
}
