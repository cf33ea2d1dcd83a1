//! The block index of a stateless querier: it shares nothing in memory with the
//! writers and learns about blocks by listing object storage. A block becomes
//! visible when its metadata object appears (writers store it last), so a query
//! never sees half a block.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use loupe_core::TenantId;
use loupe_core::storage::{BlockMeta, SpanSource, Storage, StorageError, TenantSnapshot};

/// Blocks of every tenant, refreshed from storage listings.
#[derive(Clone)]
pub struct StorageIndex {
    storage: Storage,
    blocks: Arc<RwLock<HashMap<String, BlockMeta>>>,
}

impl StorageIndex {
    pub fn new(storage: Storage) -> StorageIndex {
        StorageIndex {
            storage,
            blocks: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    /// Lists storage once: reads the metadata of new blocks and forgets deleted ones.
    /// Returns the number of blocks known.
    pub async fn refresh(&self) -> Result<usize, StorageError> {
        let paths = self.storage.list_meta_paths().await?;
        let new: Vec<String> = {
            let known = self.blocks.read().expect("index lock");
            paths
                .iter()
                .filter(|p| !known.contains_key(*p))
                .cloned()
                .collect()
        };
        let mut read = Vec::with_capacity(new.len());
        for path in new {
            match self.storage.read_meta(&path).await {
                Ok(meta) => read.push((path, meta)),
                // A block deleted between listing and reading (compaction) is skipped.
                Err(StorageError::Store(object_store::Error::NotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        let mut known = self.blocks.write().expect("index lock");
        let present: std::collections::HashSet<&String> = paths.iter().collect();
        known.retain(|p, _| present.contains(p));
        known.extend(read);
        Ok(known.len())
    }

    /// Refreshes every `interval` until the task is dropped; errors are logged and
    /// the last good index stays in use.
    pub async fn refresh_loop(self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "listing blocks failed; serving the last known blocks");
            }
        }
    }
}

impl SpanSource for StorageIndex {
    fn snapshot(&self, tenant: &TenantId) -> TenantSnapshot {
        let prefix = format!("{}/", loupe_core::storage::blocks_prefix(tenant));
        let known = self.blocks.read().expect("index lock");
        // The tenant is checked twice: by the metadata and by where the block lies.
        let blocks: Vec<BlockMeta> = known
            .values()
            .filter(|m| &m.tenant == tenant && m.path.starts_with(&prefix))
            .cloned()
            .collect();
        let mut blocks = loupe_core::storage::visible(blocks);
        blocks.sort_by(|a, b| a.block_id.cmp(&b.block_id));
        TenantSnapshot {
            blocks,
            ..TenantSnapshot::default()
        }
    }
}
