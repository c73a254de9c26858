//! The settings a PostgreSQL store URL carries for erlmail itself (`pool_size`,
//! `connect_timeout`), split off before the URL is handed to sqlx.

use std::time::Duration;

use super::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE};
use crate::store::{StoreError, StoreResult};

/// The settings `PostgresStore::open` takes from a store URL besides what libpq-style
/// URLs already carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// The URL without erlmail's own query parameters, as handed to sqlx.
    pub url: String,
    /// Maximum connections of the pool (`pool_size=N`, default `DEFAULT_POOL_SIZE`).
    pub pool_size: u32,
    /// Connect and acquire timeout (`connect_timeout=SECONDS`, default
    /// `DEFAULT_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
}

impl PgSettings {
    /// Split erlmail's query parameters (`pool_size`, `connect_timeout`) off a
    /// `postgres://` URL; the others are left for sqlx. `Invalid` on a bad value.
    pub fn from_url(url: &str) -> StoreResult<PgSettings> {
        let mut settings = PgSettings {
            url: url.to_string(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let Some((base, query)) = url.split_once('?') else {
            return Ok(settings);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "pool_size" => {
                    settings.pool_size =
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| {
                                StoreError::Invalid(format!(
                                    "store_url: pool_size={value:?} is not a positive number"
                                ))
                            })?;
                }
                "connect_timeout" => {
                    let secs = value
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            StoreError::Invalid(format!(
                                "store_url: connect_timeout={value:?} is not a positive \
                                 number of seconds"
                            ))
                        })?;
                    settings.connect_timeout = Duration::from_secs(secs);
                }
                _ => kept.push(pair),
            }
        }
        settings.url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_url_parameters_are_split_off() {
        let s = PgSettings::from_url("postgres://u@h:5432/db").unwrap();
        assert_eq!(
            s,
            PgSettings {
                url: "postgres://u@h:5432/db".into(),
                pool_size: DEFAULT_POOL_SIZE,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            }
        );
        let s = PgSettings::from_url(
            "postgresql://u@h/db?sslmode=disable&pool_size=3&connect_timeout=2&application_name=x",
        )
        .unwrap();
        assert_eq!(
            s.url,
            "postgresql://u@h/db?sslmode=disable&application_name=x"
        );
        assert_eq!(s.pool_size, 3);
        assert_eq!(s.connect_timeout, Duration::from_secs(2));
        let s = PgSettings::from_url("postgres://u@h/db?pool_size=7").unwrap();
        assert_eq!((s.url.as_str(), s.pool_size), ("postgres://u@h/db", 7));
        for bad in [
            "postgres://h/db?pool_size=0",
            "postgres://h/db?pool_size=x",
            "postgres://h/db?connect_timeout=",
        ] {
            assert!(
                matches!(PgSettings::from_url(bad), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
