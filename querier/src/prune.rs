//! Skipping blocks that cannot hold a trace, before the query engine opens them.
//!
//! A block's rows are sorted by trace id, so each row group covers a narrow id range,
//! and each row group carries a bloom filter on `trace_id`. DataFusion uses both, but
//! re-reads them from storage for every file on every query. Blocks are immutable, so
//! their row-group id ranges and bloom filters are read once and kept here (about
//! 1.2 bytes per trace); a trace lookup then opens only the blocks that may hold it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use loupe_core::storage::BlockMeta;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::bloom_filter::Sbbf;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::statistics::Statistics;

/// Cached entries above this count are dropped (blocks deleted by compaction would
/// otherwise accumulate).
const MAX_CACHED_BLOCKS: usize = 100_000;
/// Blocks whose filters are loaded at once.
const LOAD_CONCURRENCY: usize = 8;

struct RowGroupFilter {
    /// Smallest and largest trace id in the row group, when the statistics say.
    range: Option<(Vec<u8>, Vec<u8>)>,
    bloom: Option<Sbbf>,
}

struct BlockFilter {
    groups: Vec<RowGroupFilter>,
}

impl BlockFilter {
    fn may_contain(&self, id: &[u8; 16]) -> bool {
        self.groups.iter().any(|g| {
            let in_range = g.range.as_ref().is_none_or(|(min, max)| {
                min.as_slice() <= id.as_slice() && id.as_slice() <= max.as_slice()
            });
            in_range && g.bloom.as_ref().is_none_or(|b| b.check(&id[..]))
        })
    }
}

/// Reads a block through the object store; its size is known from the block metadata.
struct BlockReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
}

fn store_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for BlockReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(store_error)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// The per-block trace-id filters of every block seen so far.
pub struct TraceIdFilters {
    store: Arc<dyn ObjectStore>,
    cache: Mutex<HashMap<String, Arc<BlockFilter>>>,
}

impl TraceIdFilters {
    pub fn new(store: Arc<dyn ObjectStore>) -> TraceIdFilters {
        TraceIdFilters {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn load(
        &self,
        meta: &BlockMeta,
    ) -> Result<Arc<BlockFilter>, parquet::errors::ParquetError> {
        if let Some(f) = self
            .cache
            .lock()
            .expect("filter cache lock")
            .get(&meta.path)
        {
            return Ok(f.clone());
        }
        let reader = BlockReader {
            store: self.store.clone(),
            path: Path::from(meta.path.as_str()),
            size: meta.size_bytes,
        };
        let mut builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
        let row_groups = builder.metadata().num_row_groups();
        let mut groups = Vec::with_capacity(row_groups);
        for rg in 0..row_groups {
            let range = match builder.metadata().row_group(rg).column(0).statistics() {
                Some(Statistics::FixedLenByteArray(s)) => match (s.min_opt(), s.max_opt()) {
                    (Some(min), Some(max)) => Some((min.data().to_vec(), max.data().to_vec())),
                    _ => None,
                },
                _ => None,
            };
            let bloom = builder.get_row_group_column_bloom_filter(rg, 0).await?;
            groups.push(RowGroupFilter { range, bloom });
        }
        let filter = Arc::new(BlockFilter { groups });
        let mut cache = self.cache.lock().expect("filter cache lock");
        if cache.len() >= MAX_CACHED_BLOCKS {
            cache.clear();
        }
        cache.insert(meta.path.clone(), filter.clone());
        Ok(filter)
    }

    /// The blocks that may hold spans of trace `id`. A block whose filter cannot be
    /// read is kept (the query then reads it, and reports the error if it persists).
    pub async fn candidates(&self, blocks: Vec<BlockMeta>, id: &[u8; 16]) -> Vec<BlockMeta> {
        futures::stream::iter(blocks)
            .map(|meta| async move {
                match self.load(&meta).await {
                    Ok(f) => f.may_contain(id).then_some(meta),
                    Err(e) => {
                        tracing::warn!(block = %meta.path, error = %e, "cannot read the block's trace-id filter; scanning it");
                        Some(meta)
                    }
                }
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .filter_map(|m| async move { m })
            .collect()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::span::spans_to_batch;
    use loupe_core::storage::Storage;
    use loupe_core::{SpanRecord, TenantId};

    fn spans(traces: std::ops::Range<u16>) -> Vec<SpanRecord> {
        traces
            .map(|t| {
                let mut trace_id = [0u8; 16];
                trace_id[..2].copy_from_slice(&t.to_be_bytes());
                trace_id[15] = 1;
                SpanRecord {
                    trace_id: trace_id.to_vec(),
                    span_id: vec![1; 8],
                    ..Default::default()
                }
            })
            .collect()
    }

    fn id(t: u16) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..2].copy_from_slice(&t.to_be_bytes());
        id[15] = 1;
        id
    }

    #[tokio::test]
    async fn only_blocks_that_may_hold_the_trace_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let tenant: TenantId = "ns/p".parse().unwrap();
        let mut metas = Vec::new();
        for (i, range) in [0..20_000u16, 20_000..40_000, 40_000..60_000]
            .into_iter()
            .enumerate()
        {
            let batch = spans_to_batch(&spans(range)).unwrap();
            let job = loupe_ingester::writer::BlockJob::new(
                tenant.clone(),
                i as u64,
                i as u64,
                vec![batch],
                0,
                0,
            );
            let meta = loupe_ingester::block::write(&storage, "wal", &job)
                .await
                .unwrap();
            metas.push(meta);
        }
        let filters = TraceIdFilters::new(storage.object_store());
        let found = filters.candidates(metas.clone(), &id(25_000)).await;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].block_id, metas[1].block_id);
        // Absent ids inside a row group's range are rejected by its bloom filter; a
        // few false positives (1 %) are allowed.
        let mut hits = 0;
        for t in 0..1000u16 {
            let mut absent = id(t * 50);
            absent[15] = 2;
            hits += filters.candidates(metas.clone(), &absent).await.len();
        }
        assert!(hits < 60, "{hits} false positives in 1000 lookups");
        // A block whose file cannot be read is kept rather than silently skipped.
        let mut missing = metas[0].clone();
        missing.path = "tenants/ns/p/blocks/missing.parquet".into();
        assert_eq!(filters.candidates(vec![missing], &id(1)).await.len(), 1);
    }
}
