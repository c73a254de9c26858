//! The SQLite store's accounts (domains, users) and mailboxes.

use rusqlite::params;

use super::conn::{all, col0, execute, one, sql_err, write_tx};
use super::SqliteStore;
use crate::store::common::{
    check_hash, norm_address, norm_domain, norm_mailbox, read_message_summary, read_stored_message,
};
use crate::store::sql;
use crate::store::{
    AccountStore, MailboxStore, MessageSummary, StoreError, StoreResult, StoredMessage,
};
use chrono::Utc;

impl SqliteStore {
    /// Whether `sql` finds a row for `key`.
    async fn exists(&self, sql: &'static str, key: String) -> StoreResult<bool> {
        let found: Option<i64> = self.pool.run(move |c| one(c, sql, [key], col0)).await?;
        Ok(found.is_some())
    }
}

#[async_trait::async_trait]
impl AccountStore for SqliteStore {
    async fn add_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        let done = self
            .pool
            .run(move |c| {
                execute(
                    c,
                    "INSERT INTO domains (name, created_at) VALUES (?1, ?2)
                     ON CONFLICT (name) DO NOTHING",
                    params![name, Utc::now().timestamp_millis()],
                )
            })
            .await?;
        Ok(done == 1)
    }

    async fn remove_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Users, their mailboxes and messages go with it (ON DELETE CASCADE).
        let done = self
            .pool
            .run(move |c| execute(c, "DELETE FROM domains WHERE name = ?1", [name]))
            .await?;
        Ok(done == 1)
    }

    async fn list_domains(&self) -> StoreResult<Vec<String>> {
        self.pool
            .run(|c| all(c, "SELECT name FROM domains ORDER BY name", [], col0))
            .await
    }

    async fn is_local_domain(&self, name: &str) -> StoreResult<bool> {
        let Ok(name) = norm_domain(name) else {
            return Ok(false);
        };
        self.exists(sql::DOMAIN_EXISTS, name).await
    }

    async fn add_user(&self, address: &str, password_hash: &str) -> StoreResult<()> {
        let (address, local, domain) = norm_address(address)?;
        check_hash(password_hash)?;
        let password_hash = password_hash.to_string();
        self.locked(move |conn| {
            let tx = write_tx(conn)?;
            let known: Option<i64> = one(&tx, sql::DOMAIN_EXISTS, [&domain], col0)?;
            if known.is_none() {
                return Err(StoreError::Invalid(format!("unknown domain {domain}")));
            }
            let done = execute(
                &tx,
                sql::INSERT_USER,
                params![
                    address,
                    local,
                    domain,
                    password_hash,
                    Utc::now().timestamp_millis()
                ],
            )?;
            if done != 1 {
                return Err(StoreError::Invalid(format!(
                    "user {address} already exists"
                )));
            }
            tx.commit().map_err(sql_err)
        })
        .await
    }

    async fn set_password(&self, address: &str, password_hash: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        check_hash(password_hash)?;
        let password_hash = password_hash.to_string();
        let done = self
            .pool
            .run(move |c| execute(c, sql::SET_PASSWORD, [password_hash, address]))
            .await?;
        Ok(done == 1)
    }

    async fn remove_user(&self, address: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        let done = self
            .pool
            .run(move |c| execute(c, sql::DELETE_USER, [address]))
            .await?;
        Ok(done == 1)
    }

    async fn list_users(&self, domain: Option<&str>) -> StoreResult<Vec<String>> {
        let domain = domain.map(norm_domain).transpose()?;
        self.pool
            .run(move |c| match domain {
                Some(d) => all(
                    c,
                    "SELECT address FROM users WHERE domain = ?1 ORDER BY address",
                    [d],
                    col0,
                ),
                None => all(c, "SELECT address FROM users ORDER BY address", [], col0),
            })
            .await
    }

    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        self.pool
            .run(move |c| one(c, sql::PASSWORD_HASH, [address], col0))
            .await
    }

    fn recipient_now(&self, address: &str) -> Option<StoreResult<(bool, bool)>> {
        // Another thread using the connection: take the pool rather than wait.
        let guard = self.reader.try_lock().ok()?;
        let conn = guard.as_ref()?;
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        let Ok(domain) = norm_domain(domain) else {
            return Some(Ok((false, false)));
        };
        let user = norm_address(address).map(|(a, _, _)| a).ok();
        let found = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM domains WHERE name = ?1),
                        EXISTS (SELECT 1 FROM users WHERE address = ?2)",
            )
            .and_then(|mut s| {
                s.query_row(params![domain, user], |r| {
                    Ok((r.get::<_, bool>(0)?, r.get::<_, bool>(1)?))
                })
            });
        match found {
            Ok((local, exists)) => Some(Ok((local, local && exists))),
            // Busy (a writer recovering the WAL index) or any other trouble: the pool's
            // path answers, with its busy timeout and error mapping.
            Err(_) => None,
        }
    }

    async fn user_exists(&self, address: &str) -> StoreResult<bool> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(false);
        };
        self.exists(sql::USER_EXISTS, address).await
    }
}

#[async_trait::async_trait]
impl MailboxStore for SqliteStore {
    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(Vec::new());
        };
        let mailbox = norm_mailbox(mailbox).to_string();
        self.pool
            .run(move |c| {
                all(c, sql::LIST_MAILBOX, [address, mailbox], |r| {
                    read_message_summary(r)
                })
            })
            .await
    }

    async fn get_message(&self, address: &str, id: i64) -> StoreResult<Option<StoredMessage>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        self.pool
            .run(move |c| {
                one(c, sql::GET_MESSAGE, params![address, id], |r| {
                    read_stored_message(r)
                })
            })
            .await
    }
}
