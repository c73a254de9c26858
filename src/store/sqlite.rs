//! The embedded SQLite backend.
use super::*;
/// SQLite store.
pub struct SqliteStore;
impl SqliteStore {
    /// Open or create.
    pub async fn open(_path: &std::path::Path) -> StoreResult<Self> {
        Err(StoreError::Backend("todo".into()))
    }
}
