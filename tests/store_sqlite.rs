//! The store contract suite through the public API: `erlmail::store::open` on a
//! `sqlite://` URL, as the daemon and the admin commands open it. The suite is behind
//! the `test-support` feature, which scripts/test enables.
#![cfg(feature = "test-support")]

#[tokio::test]
async fn contract_suite_through_open() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("spool/erlmail.db").display());
    let store = erlmail::store::open(&url).await.unwrap();
    erlmail::store::contract::run_all(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_opens_of_one_file_share_the_queue_safely() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("erlmail.db").display());
    let a = erlmail::store::open(&url).await.unwrap();
    let b = erlmail::store::open(&url).await.unwrap();
    erlmail::store::contract::concurrent_claims(a.as_ref(), b.as_ref(), 200).await;
}
