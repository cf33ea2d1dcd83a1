//! Parquet blocks: spans of one tenant, sorted by (trace_id, start_ns).

use std::hash::Hasher as _;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{SortColumn, interleave_record_batch, lexsort_to_indices};
use arrow::datatypes::Int64Type;
use bytes::Bytes;
use loupe_core::score::{self, ScoreRecord};
use loupe_core::span::{col, span_schema};
use loupe_core::storage;
use loupe_core::storage::{BLOCK_FORMAT_VERSION, BlockMeta, Storage, StorageError};

use crate::writer::BlockJob;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

/// Fault injection for crash tests: `LOUPE_FAULT_BLOCK_META_DELAY_MS` holds every
/// block between its Parquet file and its metadata, so a test can kill a writer in
/// the middle of writing a block. Unset in normal operation.
static FAULT_META_DELAY: std::sync::LazyLock<Option<std::time::Duration>> =
    std::sync::LazyLock::new(|| {
        std::env::var("LOUPE_FAULT_BLOCK_META_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });

/// Rows per Parquet row group: small enough that a trace lookup reads little,
/// large enough to compress well (~8 MB of LLM spans).
pub const ROW_GROUP_ROWS: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("encoding block: {0}")]
    Encode(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// An encoded block, ready to store.
pub struct EncodedBlock {
    pub parquet: Bytes,
    pub spans: u64,
    pub traces: u64,
    pub min_start_ns: i64,
    pub max_start_ns: i64,
    pub max_end_ns: i64,
    /// Digest of the block's `(trace_id, span_id)` pairs in order.
    pub digest: u64,
}

/// Settings shared by span and score files: zstd, page statistics, and a bloom
/// filter on `trace_id` sized for `traces` ids (the column of that name in both).
fn trace_keyed(traces: u64) -> parquet::file::properties::WriterPropertiesBuilder {
    let trace_id = ColumnPath::from(col::TRACE_ID);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid level"),
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_column_bloom_filter_enabled(trace_id.clone(), true)
        .set_column_bloom_filter_fpp(trace_id.clone(), 0.01)
        .set_column_bloom_filter_max_ndv(trace_id.clone(), traces.max(1))
        // Random ids do not compress or dictionary-encode.
        .set_column_dictionary_enabled(trace_id, false)
}

fn writer_properties(traces: u64) -> WriterProperties {
    trace_keyed(traces)
        .set_column_dictionary_enabled(ColumnPath::from(col::SPAN_ID), false)
        .set_sorting_columns(Some(vec![
            SortingColumn {
                column_idx: 0,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: 7,
                descending: false,
                nulls_first: false,
            },
        ]))
        .build()
}

/// Sorts the batches by (trace_id, start_ns) and encodes them as one Parquet file.
/// CPU-heavy: call it from a blocking thread.
pub fn encode(batches: &[RecordBatch]) -> Result<EncodedBlock, BlockError> {
    let enc = |e: &dyn std::fmt::Display| BlockError::Encode(e.to_string());
    let schema = span_schema();
    // Sort on (trace_id, start) across the chunks, then gather every column once in
    // that order: concatenating the chunks first would copy every text column twice.
    let keys = |c: usize| {
        let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
        arrow::compute::concat(&parts).map_err(|e| enc(&e))
    };
    let sorted = if batches.iter().all(|b| b.num_rows() == 0) {
        RecordBatch::new_empty(schema.clone())
    } else {
        sort_chunks(batches, keys(0)?, keys(7)?).map_err(|e| enc(&e))?
    };

    let ids = sorted.column(0).as_fixed_size_binary();
    let span_ids = sorted.column(1).as_fixed_size_binary();
    // SipHash with fixed keys: the same content gives the same digest in every run of
    // one build (enough for a retried write to find its own block).
    let mut digest = std::hash::DefaultHasher::new();
    for i in 0..ids.len() {
        digest.write(ids.value(i));
        digest.write(span_ids.value(i));
    }
    let traces = (0..ids.len())
        .filter(|&i| i == 0 || ids.value(i) != ids.value(i - 1))
        .count() as u64;
    let starts = sorted.column(7).as_primitive::<Int64Type>();
    let ends = sorted.column(8).as_primitive::<Int64Type>();
    let min_start_ns = arrow::compute::min(starts).unwrap_or(0);
    let max_start_ns = arrow::compute::max(starts).unwrap_or(0);
    let max_end_ns = arrow::compute::max(ends).unwrap_or(0);

    let mut out = Vec::with_capacity(sorted.get_array_memory_size() / 4);
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(writer_properties(traces)))
        .map_err(|e| enc(&e))?;
    writer.write(&sorted).map_err(|e| enc(&e))?;
    writer.close().map_err(|e| enc(&e))?;
    Ok(EncodedBlock {
        parquet: Bytes::from(out),
        spans: sorted.num_rows() as u64,
        traces,
        min_start_ns,
        max_start_ns,
        max_end_ns,
        digest: digest.finish(),
    })
}

/// Sorts rows of `batches` by the concatenated `trace_ids`, then `starts`, gathering
/// each column once.
fn sort_chunks(
    batches: &[RecordBatch],
    trace_ids: arrow::array::ArrayRef,
    starts: arrow::array::ArrayRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let sort = |values| SortColumn {
        values,
        options: None,
    };
    let indices = lexsort_to_indices(&[sort(trace_ids), sort(starts)], None)?;
    let mut chunk_of = Vec::with_capacity(indices.len());
    for (i, b) in batches.iter().enumerate() {
        chunk_of.extend((0..b.num_rows()).map(|row| (i, row)));
    }
    let order: Vec<(usize, usize)> = indices
        .values()
        .iter()
        .map(|&i| chunk_of[i as usize])
        .collect();
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    interleave_record_batch(&refs, &order)
}

/// Encodes scores as a Parquet file sorted by trace id, with a bloom filter on it.
pub fn encode_scores(scores: &[ScoreRecord]) -> Result<Bytes, BlockError> {
    let enc = |e: &dyn std::fmt::Display| BlockError::Encode(e.to_string());
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| (&a.trace_id, a.created_ns).cmp(&(&b.trace_id, b.created_ns)));
    let batch = score::scores_to_batch(&sorted).map_err(|e| enc(&e))?;
    encode_score_batch(&batch)
}

/// Encodes a batch of scores (in [`score::score_schema`], sorted by trace id) as a
/// Parquet file with a bloom filter on trace ids.
pub fn encode_score_batch(batch: &RecordBatch) -> Result<Bytes, BlockError> {
    let enc = |e: &dyn std::fmt::Display| BlockError::Encode(e.to_string());
    let props = trace_keyed(batch.num_rows() as u64).build();
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, score::score_schema(), Some(props)).map_err(|e| enc(&e))?;
    writer.write(batch).map_err(|e| enc(&e))?;
    writer.close().map_err(|e| enc(&e))?;
    Ok(Bytes::from(out))
}

/// Encodes and stores a block holding `source` records `first..=last`, then its
/// metadata (last, which makes it visible). Rewriting the same range writes the same
/// paths, so a retried flush never leaves two copies.
pub async fn write(
    storage: &Storage,
    source: &str,
    job: &BlockJob,
) -> Result<BlockMeta, BlockError> {
    let (tenant, first, last, seen_spans) = (&job.tenant, job.first, job.last, job.seen_spans);
    let batches = job.batches.clone();
    let block = tokio::task::spawn_blocking(move || encode(&batches))
        .await
        .map_err(|e| BlockError::Encode(e.to_string()))??;
    let mut digest = std::hash::DefaultHasher::new();
    digest.write_u64(block.digest);
    digest.write_u64(seen_spans);
    digest.write_u64(job.seq);
    for s in &job.scores {
        digest.write(s.score_id.as_bytes());
    }
    let block_id = storage::block_id(source, first, last, digest.finish());
    let path = storage::parquet_path(tenant, &block_id);
    let size_bytes = block.parquet.len() as u64;
    storage.put_durable(&path, block.parquet).await?;
    if !job.scores.is_empty() {
        let scores = job.scores.clone();
        let bytes = tokio::task::spawn_blocking(move || encode_scores(&scores))
            .await
            .map_err(|e| BlockError::Encode(e.to_string()))??;
        storage
            .put_durable(&storage::scores_path(tenant, &block_id), bytes)
            .await?;
    }
    if let Some(pause) = *FAULT_META_DELAY {
        tokio::time::sleep(pause).await;
    }
    let meta = BlockMeta {
        format_version: BLOCK_FORMAT_VERSION,
        block_id,
        tenant: tenant.clone(),
        path,
        size_bytes,
        spans: block.spans,
        traces: block.traces,
        min_start_ns: block.min_start_ns,
        max_start_ns: block.max_start_ns,
        max_end_ns: block.max_end_ns,
        source: source.to_owned(),
        first_seq: first,
        last_seq: last,
        seen_spans: seen_spans.max(block.spans),
        created_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX),
        scores: job.scores.len() as u64,
        compaction: None,
    };
    storage.put_meta(&meta).await?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::SpanRecord;
    use loupe_core::span::spans_to_batch;
    use parquet::file::properties::ReaderProperties;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::file::serialized_reader::ReadOptionsBuilder;

    #[test]
    fn blocks_are_sorted_with_bloom_filter_and_page_index() {
        let mut spans = Vec::new();
        for t in [9u8, 3, 7, 3] {
            for s in [5u64, 1] {
                spans.push(SpanRecord {
                    trace_id: vec![t; 16],
                    span_id: vec![(s as u8) ^ t; 8],
                    start_ns: 1_000 * s + t as u64,
                    end_ns: 1_000 * s + 500,
                    name: format!("t{t}-s{s}"),
                    ..Default::default()
                });
            }
        }
        let half = spans.split_off(4);
        let batches = vec![
            spans_to_batch(&spans).unwrap(),
            spans_to_batch(&half).unwrap(),
        ];
        let block = encode(&batches).unwrap();
        assert_eq!(block.spans, 8);
        assert_eq!(block.traces, 3);
        assert_eq!(block.min_start_ns, 1_003);

        let props = ReaderProperties::builder()
            .set_read_bloom_filter(true)
            .build();
        let options = ReadOptionsBuilder::new()
            .with_reader_properties(props)
            .build();
        let reader =
            SerializedFileReader::new_with_options(block.parquet.clone(), options).unwrap();
        let rg = reader.metadata().row_group(0);
        assert!(
            rg.column(0).bloom_filter_offset().is_some(),
            "trace_id has a bloom filter"
        );
        assert!(
            rg.column(0).column_index_offset().is_some(),
            "page index is written"
        );
        let bloom = reader.get_row_group(0).unwrap();
        let sbbf = bloom
            .get_column_bloom_filter(0)
            .expect("bloom filter readable");
        assert!(sbbf.check(&[3u8; 16][..]));
        assert!(!sbbf.check(&[4u8; 16][..]));

        let batches: Vec<_> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(block.parquet, 1024)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let names: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let a = b.column(3).as_string::<i32>().clone();
                (0..a.len()).map(move |i| a.value(i).to_owned())
            })
            .collect();
        assert_eq!(
            names,
            [
                "t3-s1", "t3-s1", "t3-s5", "t3-s5", "t7-s1", "t7-s5", "t9-s1", "t9-s5"
            ]
        );
    }

    fn one_span(trace: u8) -> Vec<RecordBatch> {
        let span = SpanRecord {
            trace_id: vec![trace; 16],
            span_id: vec![trace; 8],
            start_ns: 1,
            end_ns: 2,
            ..Default::default()
        };
        vec![spans_to_batch(&[span]).unwrap()]
    }

    #[tokio::test]
    async fn blocks_of_one_offset_range_never_overwrite_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let t: loupe_core::TenantId = "ns/p".parse().unwrap();
        // Two traces of one log record, written in two blocks; then two blocks that
        // only count dropped spans, with no new record in between.
        let job = |batches, seen, seq| BlockJob::new(t.clone(), 7, 7, batches, seen, seq);
        let a = write(&storage, "wal", &job(one_span(1), 1, 0))
            .await
            .unwrap();
        let b = write(&storage, "wal", &job(one_span(2), 1, 1))
            .await
            .unwrap();
        // Same range, content and count as each other, one block apart.
        let c = write(&storage, "wal", &job(Vec::new(), 3, 2))
            .await
            .unwrap();
        let d = write(&storage, "wal", &job(Vec::new(), 3, 3))
            .await
            .unwrap();
        let (metas, _) = storage.list_blocks().await.unwrap();
        assert_eq!(metas.len(), 4, "{metas:?}");
        assert_eq!(metas.iter().map(|m| m.spans).sum::<u64>(), 2);
        assert_eq!(
            metas.iter().map(|m| m.seen_spans).sum::<u64>(),
            1 + 1 + 3 + 3
        );
        // A retried write of the same job is the same block.
        let again = write(&storage, "wal", &job(one_span(1), 1, 0))
            .await
            .unwrap();
        assert_eq!(again.block_id, a.block_id);
        assert_eq!(storage.list_blocks().await.unwrap().0.len(), 4);
        let ids: std::collections::HashSet<_> = [a, b, c, d].map(|m| m.block_id).into();
        assert_eq!(ids.len(), 4);
    }
}
