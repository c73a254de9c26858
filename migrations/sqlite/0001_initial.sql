-- erlmail store, schema version 1 (ARCHITECTURE §4).
--
-- Times are integer unix milliseconds (UTC). Booleans are integers 0/1. Domains and user
-- addresses are stored lower-cased; queue recipients as received. Everything but the
-- INTEGER PRIMARY KEY row ids is standard SQL, so
-- the PostgreSQL port only swaps those for identity columns and BLOB for BYTEA.

CREATE TABLE domains (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id             INTEGER PRIMARY KEY,
    address        TEXT NOT NULL UNIQUE,
    local_part     TEXT NOT NULL,
    domain         TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    password_hash  TEXT NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE INDEX users_domain ON users (domain);

CREATE TABLE mailboxes (
    id       INTEGER PRIMARY KEY,
    user_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    UNIQUE (user_id, name)
);

CREATE TABLE messages (
    id             INTEGER PRIMARY KEY,
    mailbox_id     INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    sender         TEXT NOT NULL,
    -- envelope recipients of this delivery, one per line
    recipients     TEXT NOT NULL,
    subject        TEXT,
    size           INTEGER NOT NULL,
    internal_date  INTEGER NOT NULL,
    body           BLOB NOT NULL
);
CREATE INDEX messages_mailbox ON messages (mailbox_id, id);

CREATE TABLE outgoing (
    id               TEXT PRIMARY KEY,
    sender           TEXT NOT NULL,
    ret              TEXT,
    envid            TEXT,
    client_ip        TEXT NOT NULL,
    helo             TEXT NOT NULL,
    received_at      INTEGER NOT NULL,
    tries            INTEGER NOT NULL DEFAULT 0,
    last_try_at      INTEGER,
    last_error       TEXT,
    next_retry_at    INTEGER NOT NULL,
    lock_owner       TEXT,
    lock_expires_at  INTEGER,
    held             INTEGER NOT NULL DEFAULT 0,
    size             INTEGER NOT NULL,
    body             BLOB NOT NULL
);
CREATE INDEX outgoing_next_retry ON outgoing (next_retry_at);

CREATE TABLE outgoing_rcpts (
    queue_id       TEXT NOT NULL REFERENCES outgoing (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL,
    address        TEXT NOT NULL,
    orcpt          TEXT,
    notify         TEXT,
    state          TEXT NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'delivered', 'failed')),
    last_response  TEXT,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (queue_id, seq)
);
