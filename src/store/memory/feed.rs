//! The change log the rulebook's publications go to, followed by polling.

use async_trait::async_trait;

use super::MemoryStore;
use crate::store::StoreError;
use crate::store::changes::{ChangeLog, Logged, Position};

#[async_trait]
impl ChangeLog for MemoryStore {
    async fn newest(&self) -> Result<Position, StoreError> {
        Ok(self
            .state()?
            .changes
            .last()
            .map(|c| c.position.clone())
            .unwrap_or_default())
    }

    async fn read_from(&self, from: i64, limit: usize) -> Result<Vec<Logged>, StoreError> {
        let state = self.state()?;
        let start = state.changes.partition_point(|c| c.position.seq < from);
        Ok(state.changes[start..].iter().take(limit).cloned().collect())
    }
}
