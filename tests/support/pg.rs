//! Test support: a PostgreSQL database of its own for one test.
//!
//! `ERLMAIL_TEST_PG` names a server and an existing database to administer from (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`). `TestDb::create` makes a fresh database
//! `erlmail_test_<random>` there and dropping the guard drops it again (also when the test
//! panicked), so tests run in parallel and repeatedly. Unset, it prints a note and gives
//! `None`; set but unreachable, it panics. Include it with
//! `#[path = "support/pg.rs"] mod pg;`.
#![allow(dead_code)]

use std::time::Duration;

use rand::RngCore;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// A database of its own for one test, dropped when the guard is.
pub struct TestDb {
    /// `postgres://` URL of the fresh database.
    pub url: String,
    /// Its name, `erlmail_test_<16 hex digits>`.
    pub name: String,
    /// URL of the administration database named by `ERLMAIL_TEST_PG`.
    pub admin_url: String,
}

impl TestDb {
    /// Create a fresh database on the `ERLMAIL_TEST_PG` server; `None` (after a note that
    /// `skipping` is skipped) when the variable is unset. Panics when it is set but the
    /// server is unreachable.
    pub async fn create(skipping: &str) -> Option<TestDb> {
        let Ok(admin_url) = std::env::var("ERLMAIL_TEST_PG") else {
            eprintln!("note: ERLMAIL_TEST_PG is not set; skipping {skipping}");
            return None;
        };
        let name = format!("erlmail_test_{:016x}", rand::rng().next_u64());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("ERLMAIL_TEST_PG={admin_url} is unreachable: {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = with_database(&admin_url, &name);
        Some(TestDb {
            url,
            name,
            admin_url,
        })
    }

    /// The database URL with extra query parameters (`key=value&…`).
    pub fn url_with(&self, params: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}{params}", self.url)
    }

    /// A one-connection pool on the administration database.
    pub async fn admin_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin_url)
            .await
            .unwrap()
    }

    /// A small pool on the test database, to look at the shared state directly.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    /// Drop the database even when the test panicked: a runtime of its own on a thread of
    /// its own, since `drop` cannot await and may run inside the test's runtime.
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin_url)
                    .await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await?;
                admin.close().await;
                Ok::<(), sqlx::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("note: could not drop test database {}: {e}", self.name);
        }
    }
}

/// `url` with its database (the path) replaced by `name`, query kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}
