//! The typed way to ask `erlmail_store`: find it, send the request, wait for the answer
//! within the caller's timeout, and say plainly what went wrong ([`Unanswered`]) when
//! there was no answer. Every actor that asks the store goes through here.

use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};

use super::msg::{QueueOp, StoreMsg};
use crate::store::{StoreError, StoreResult};

/// Why a request to the store got no answer, or a failed one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unanswered {
    /// No store actor is registered (it is restarting).
    #[error("store not running")]
    NotRunning,
    /// The store did not answer within the timeout, dropped the request, or its
    /// mailbox was closed.
    #[error("store did not answer")]
    NoAnswer,
    /// The store answered with an error.
    #[error("{0}")]
    Store(StoreError),
}

/// Asks the store, waiting at most `timeout` for each answer.
#[derive(Debug, Clone, Copy)]
pub struct StoreClient {
    timeout: Duration,
}

impl StoreClient {
    /// A client whose requests wait at most `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        StoreClient { timeout }
    }

    /// Send the request `build` makes and wait for its answer as it comes.
    pub async fn call<T: Send + 'static>(
        &self, build: impl FnOnce(RpcReplyPort<T>) -> StoreMsg,
    ) -> Result<T, Unanswered> {
        let store: ActorRef<StoreMsg> = ractor::registry::where_is(super::STORE)
            .ok_or(Unanswered::NotRunning)?
            .into();
        match store.call(build, Some(self.timeout)).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            _ => Err(Unanswered::NoAnswer),
        }
    }

    /// Send the request `build` makes and wait for the store's result.
    pub async fn ask<T: Send + 'static>(
        &self, build: impl FnOnce(RpcReplyPort<StoreResult<T>>) -> StoreMsg,
    ) -> Result<T, Unanswered> {
        self.call(build).await?.map_err(Unanswered::Store)
    }

    /// An outgoing-queue operation, waiting for the store's result.
    pub async fn queue<T: Send + 'static>(
        &self, build: impl FnOnce(RpcReplyPort<StoreResult<T>>) -> QueueOp,
    ) -> Result<T, Unanswered> {
        self.ask(|reply| StoreMsg::Queue(build(reply))).await
    }
}

/// Send the store a request that needs no answer; `false` when no store is running.
pub fn cast(msg: StoreMsg) -> bool {
    ractor::registry::where_is(super::STORE).is_some_and(|cell| cell.send_message(msg).is_ok())
}
