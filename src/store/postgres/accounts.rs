//! The PostgreSQL store's accounts (domains, users) and mailboxes. Domain changes are
//! announced on `ACCOUNTS_CHANNEL` in the same statement.

use chrono::Utc;

use super::{db_err, PostgresStore, ACCOUNTS_CHANNEL};
use crate::store::common::{
    check_hash, norm_address, norm_domain, norm_mailbox, read_message_summary, read_stored_message,
};
use crate::store::sql;
use crate::store::{
    AccountStore, MailboxStore, MessageSummary, StoreError, StoreResult, StoredMessage,
};

#[async_trait::async_trait]
impl AccountStore for PostgresStore {
    async fn add_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Every node's cached list is read again once this commits.
        let added = sqlx::query(
            "WITH added AS (INSERT INTO domains (name, created_at) VALUES ($1, $2)
                            ON CONFLICT (name) DO NOTHING RETURNING name)
             SELECT pg_notify($3, name) FROM added",
        )
        .bind(&name)
        .bind(Utc::now().timestamp_millis())
        .bind(ACCOUNTS_CHANNEL)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(added.len() == 1)
    }

    async fn remove_domain(&self, name: &str) -> StoreResult<bool> {
        let name = norm_domain(name)?;
        // Users, their mailboxes and messages go with it (ON DELETE CASCADE).
        let removed = sqlx::query(
            "WITH removed AS (DELETE FROM domains WHERE name = $1 RETURNING name)
             SELECT pg_notify($2, name) FROM removed",
        )
        .bind(&name)
        .bind(ACCOUNTS_CHANNEL)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(removed.len() == 1)
    }

    async fn list_domains(&self) -> StoreResult<Vec<String>> {
        // COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
        sqlx::query_scalar("SELECT name FROM domains ORDER BY name COLLATE \"C\"")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn is_local_domain(&self, name: &str) -> StoreResult<bool> {
        let Ok(name) = norm_domain(name) else {
            return Ok(false);
        };
        self.exists(sql::DOMAIN_EXISTS, &name).await
    }

    async fn add_user(&self, address: &str, password_hash: &str) -> StoreResult<()> {
        let (address, local, domain) = norm_address(address)?;
        check_hash(password_hash)?;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // FOR SHARE keeps the domain from being removed by another node before we commit.
        let known: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM domains WHERE name = $1 FOR SHARE")
                .bind(&domain)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if known.is_none() {
            return Err(StoreError::Invalid(format!("unknown domain {domain}")));
        }
        let done = sqlx::query(sql::INSERT_USER)
            .bind(&address)
            .bind(&local)
            .bind(&domain)
            .bind(password_hash)
            .bind(Utc::now().timestamp_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Invalid(format!(
                "user {address} already exists"
            )));
        }
        tx.commit().await.map_err(db_err)
    }

    async fn set_password(&self, address: &str, password_hash: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        check_hash(password_hash)?;
        let done = self
            .changed(
                sqlx::query(sql::SET_PASSWORD)
                    .bind(password_hash)
                    .bind(&address),
            )
            .await?;
        Ok(done == 1)
    }

    async fn remove_user(&self, address: &str) -> StoreResult<bool> {
        let (address, _, _) = norm_address(address)?;
        let done = self
            .changed(sqlx::query(sql::DELETE_USER).bind(&address))
            .await?;
        Ok(done == 1)
    }

    async fn list_users(&self, domain: Option<&str>) -> StoreResult<Vec<String>> {
        match domain {
            Some(d) => {
                let d = norm_domain(d)?;
                sqlx::query_scalar(
                    "SELECT address FROM users WHERE domain = $1 ORDER BY address COLLATE \"C\"",
                )
                .bind(d)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query_scalar("SELECT address FROM users ORDER BY address COLLATE \"C\"")
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(db_err)
    }

    async fn password_hash(&self, address: &str) -> StoreResult<Option<String>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        sqlx::query_scalar(sql::PASSWORD_HASH)
            .bind(&address)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn user_exists(&self, address: &str) -> StoreResult<bool> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(false);
        };
        self.exists(sql::USER_EXISTS, &address).await
    }

    fn recipient_now(&self, address: &str) -> Option<StoreResult<(bool, bool)>> {
        // Only "not a local domain" is answered here (relayed mail, the common case); a
        // local domain's user is looked up in the database.
        let (_, domain) = address.rsplit_once('@')?;
        let domain = norm_domain(domain).ok()?;
        let domains = self.domains.read().unwrap_or_else(|e| e.into_inner());
        match domains.as_ref() {
            Some(known) if !known.contains(&domain) => Some(Ok((false, false))),
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl MailboxStore for PostgresStore {
    async fn list_mailbox(&self, address: &str, mailbox: &str) -> StoreResult<Vec<MessageSummary>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(sql::LIST_MAILBOX)
            .bind(&address)
            .bind(norm_mailbox(mailbox))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(read_message_summary).collect()
    }

    async fn get_message(&self, address: &str, id: i64) -> StoreResult<Option<StoredMessage>> {
        let Ok((address, _, _)) = norm_address(address) else {
            return Ok(None);
        };
        let row = sqlx::query(sql::GET_MESSAGE)
            .bind(&address)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(read_stored_message).transpose()
    }
}
