//! An erlmail cluster: several `erlmail serve` processes (own `node_name`, own ports) on
//! one PostgreSQL database relay messages injected across all of them to one sink, and
//! each message is delivered exactly once.
//!
//! Needs `ERLMAIL_TEST_PG` (e.g. `postgres://postgres@127.0.0.1:5432/test`): unset, the
//! tests print a note and pass without running; set and unreachable, they fail. Each test
//! runs on a database of its own, `erlmail_test_<random>`, dropped at the end.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/sink.rs"]
mod sink;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use daemon::Daemon;
use rand::RngCore;
use sink::{Sink, SinkConfig, StartTls};
use sqlx::postgres::PgPoolOptions;

/// A database of its own for one test, dropped when the guard is (after the daemons,
/// which are declared later and so dropped first).
struct TestDb {
    url: String,
    name: String,
    admin_url: String,
}

impl TestDb {
    /// Create a fresh database on the `ERLMAIL_TEST_PG` server; `None` (after a note)
    /// when the variable is unset. Panics when it is set but the server is unreachable.
    async fn create() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var("ERLMAIL_TEST_PG") else {
            eprintln!("note: ERLMAIL_TEST_PG is not set; skipping this cluster test");
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
        // The database replaces the path of the administration URL; the query is kept.
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url.as_str(), String::new()),
        };
        let authority_end = base
            .find("://")
            .and_then(|s| base[s + 3..].find('/').map(|i| s + 3 + i))
            .unwrap_or(base.len());
        let url = format!("{}/{name}{query}", &base[..authority_end]);
        Some(TestDb {
            url,
            name,
            admin_url,
        })
    }
}

impl Drop for TestDb {
    /// Drop the database even when the test panicked, on a runtime of its own.
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

/// The configuration of one relaying node on the shared database.
fn node_yaml(db: &TestDb, sink: &Sink, node: &str) -> String {
    format!(
        "store_url: \"{}\"\n\
         node_name: \"{node}\"\n\
         server_smtp_relay_clients: [\"127.0.0.1/32\"]\n\
         server_smtp_relay_host: \"127.0.0.1:{}\"\n\
         server_smtp_name: \"{node}.relay.test\"\n\
         server_smtp_queue_interval: \"100ms\"\n",
        db.url,
        sink.port()
    )
}

/// How many messages each node's log says it sent.
fn sent_by(d: &Daemon) -> usize {
    let log = d.log_text();
    log.matches("status=\"sent\"").count() + log.matches("status=sent").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_database_deliver_each_message_exactly_once() {
    const N: usize = 5000;
    const SESSIONS: usize = 3;
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    let Some(db) = TestDb::create().await else {
        return;
    };
    let sink = Sink::start(SinkConfig {
        starttls: StartTls::Off,
        ..SinkConfig::default()
    })
    .await;
    let started = Instant::now();
    // All three start at once on the empty database: the migration runs exactly once.
    let daemons: Vec<Daemon> = std::thread::scope(|sc| {
        let handles: Vec<_> = NODES
            .iter()
            .map(|node| {
                let yaml = node_yaml(&db, &sink, node);
                sc.spawn(move || Daemon::start(&yaml))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The messages spread over all nodes, SESSIONS SMTP sessions per node, all at once:
    // message i goes through session i % (nodes * SESSIONS).
    let lanes = NODES.len() * SESSIONS;
    std::thread::scope(|sc| {
        for lane in 0..lanes {
            let d = &daemons[lane % NODES.len()];
            sc.spawn(move || {
                let mut s = d.connect();
                assert!(s.cmd("EHLO client.test").starts_with("250"));
                for i in (lane..N).step_by(lanes) {
                    let r = s.send_mail(
                        "a@client.test",
                        &["b@remote.test"],
                        &format!("Subject: m{i}\r\nX-Seq: {i}\r\n\r\nbody {i}\r\n"),
                    );
                    assert!(
                        r.starts_with("250"),
                        "message {i} via {}: {r}",
                        NODES[lane % NODES.len()]
                    );
                }
                let _ = s.cmd("QUIT");
            });
        }
    });
    let injected = started.elapsed();
    assert!(
        sink.wait_for(N, Duration::from_secs(300)).await,
        "only {} of {N} delivered",
        sink.count()
    );
    // A little longer, so that a late duplicate would be seen too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = started.elapsed();

    let mut seen: HashMap<usize, usize> = HashMap::new();
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let seq: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Seq: "))
            .expect("sequence header")
            .trim()
            .parse()
            .expect("numeric sequence");
        *seen.entry(seq).or_insert(0) += 1;
    }
    let mut dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    dups.sort();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(seen.len(), N);
    assert!((0..N).all(|i| seen.get(&i) == Some(&1)));

    let sent: Vec<usize> = daemons.iter().map(sent_by).collect();
    eprintln!(
        "{N} messages: injected in {injected:?}, all delivered after {delivered:?}; \
         sent per node {sent:?}"
    );
    assert_eq!(sent.iter().sum::<usize>(), N, "each delivery logged once");
    assert!(
        sent.iter().all(|n| *n > 0),
        "every node took part: {sent:?}"
    );

    // Nothing is left in the shared queue, as seen from any node.
    for d in &daemons {
        let (status, out, err) = d.admin(&["queue", "list"], None);
        assert!(status.success(), "{err}");
        assert!(
            out.contains("Mail queue is empty"),
            "queue not empty: {out}"
        );
    }
    drop(daemons);
}
