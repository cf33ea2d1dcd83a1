//! Tenant-scoped queries with DataFusion over a tenant's Parquet blocks and the spans
//! not yet in a block.
//!
//! Every query builds a session that can see exactly one tenant's data: the block
//! files listed in that tenant's snapshot and its in-memory head. Nothing else is
//! registered, so a query cannot reach another tenant's prefix. Values from the
//! request travel as SQL parameters (`$1`, `$2`, …), never spliced into SQL text.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::catalog::TableProvider;
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};
use loupe_core::deletion::Deletions;
use loupe_core::span::{col, span_schema};
use loupe_core::storage::{BlockMeta, SpanSource, TenantSnapshot, rounded_weight as round_weight};
use loupe_core::{LlmKind, TenantId};

use crate::model::{SearchResponse, SpanNode, TraceSummary, TraceTotals, TraceView, ms, rfc3339};
use crate::prune::TraceIdFilters;

/// The URL under which the block store is registered with DataFusion.
const STORE_URL: &str = "loupe://store/";

/// A search whose span conditions leave at most this many traces reads only their
/// spans (see [`narrowing_sql`]).
const MAX_NARROWED_TRACES: usize = 10_000;

/// Spans read by the first round of a search (see [`QueryEngine::search`]).
const FIRST_ROUND_SPANS: u64 = 250_000;

/// Spans of one trace are looked for this far around a search's time range, so that
/// a trace starting inside the range is summarised whole.
const TRACE_SLACK_NS: i64 = 3_600 * 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    BadRequest(String),
    #[error("query failed: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),
    #[error("query failed: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("query failed: {0}")]
    Internal(String),
}

/// Which traces to return, by status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    /// Traces with at least one span in error.
    Error,
    /// Traces with no span in error.
    Ok,
}

/// A trace search. Span-level filters match a trace when any of its spans matches
/// (each filter may be met by a different span, e.g. `user_id` on the root and
/// `model` on an LLM child).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchQuery {
    /// Traces starting in `[start_ns, end_ns)`.
    pub start_ns: i64,
    pub end_ns: i64,
    pub service: Option<String>,
    pub name: Option<String>,
    pub llm_kind: Option<LlmKind>,
    /// Matches the request or the response model.
    pub model: Option<String>,
    pub status: Option<StatusFilter>,
    pub min_duration_ns: Option<i64>,
    pub max_duration_ns: Option<i64>,
    pub min_cost_usd: Option<f64>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub prompt_name: Option<String>,
    pub prompt_version: Option<String>,
    /// Traces with scores matching every filter.
    pub scores: Vec<crate::scores::ScoreFilter>,
    pub limit: usize,
    /// Which traces come first (and which `limit` keeps).
    pub order: SearchOrder,
}

/// The order of search results (`order=` in the API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SearchOrder {
    /// Latest start first (the default): reads the newest blocks first and stops as
    /// soon as `limit` traces are settled.
    #[default]
    Newest,
    Oldest,
    /// By a total, largest first unless `ascending`: reads every block of the range.
    Duration {
        ascending: bool,
    },
    Cost {
        ascending: bool,
    },
    Tokens {
        ascending: bool,
    },
    Spans {
        ascending: bool,
    },
}

impl SearchOrder {
    /// Parses `newest`, `oldest`, `duration`, `cost`, `tokens` or `spans`, the last
    /// four optionally with `:asc` (smallest first) or `:desc`.
    pub fn parse(v: &str) -> Result<SearchOrder, String> {
        let (key, dir) = v.split_once(':').unwrap_or((v, "desc"));
        let ascending = match dir {
            "asc" => true,
            "desc" => false,
            _ => return Err(format!("order {v:?}: the direction is asc or desc")),
        };
        Ok(match (key, dir == "desc" || v == key) {
            ("newest", true) => SearchOrder::Newest,
            ("oldest", true) => SearchOrder::Oldest,
            ("duration", _) => SearchOrder::Duration { ascending },
            ("cost", _) => SearchOrder::Cost { ascending },
            ("tokens", _) => SearchOrder::Tokens { ascending },
            ("spans", _) => SearchOrder::Spans { ascending },
            _ => {
                return Err(format!(
                    "order must be newest, oldest, duration, cost, tokens or spans (with :asc or :desc for the last four), got {v:?}"
                ));
            }
        })
    }

    /// The SQL `ORDER BY` over the search's trace columns.
    fn sql(self) -> String {
        let by = |expr: &str, ascending: bool| {
            let dir = if ascending { "ASC" } else { "DESC" };
            format!("{expr} {dir} NULLS LAST, start_ns DESC, trace_id ASC")
        };
        match self {
            SearchOrder::Newest => "start_ns DESC, trace_id ASC".into(),
            SearchOrder::Oldest => "start_ns ASC, trace_id ASC".into(),
            SearchOrder::Duration { ascending } => by("end_ns - start_ns", ascending),
            SearchOrder::Cost { ascending } => by("coalesce(cost_usd, 0)", ascending),
            SearchOrder::Tokens { ascending } => by("coalesce(total_tokens, 0)", ascending),
            SearchOrder::Spans { ascending } => by("span_count", ascending),
        }
    }

    /// Sorts hits as [`SearchOrder::sql`] does.
    fn sort(self, hits: &mut [Hit]) {
        use std::cmp::Ordering;
        let newest = |a: &Hit, b: &Hit| b.start_ns.cmp(&a.start_ns).then(a.id.cmp(&b.id));
        let by = |key: fn(&TraceTotals) -> f64, ascending: bool| {
            move |a: &Hit, b: &Hit| {
                let (x, y) = (key(&a.summary.totals), key(&b.summary.totals));
                let o = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
                (if ascending { o } else { o.reverse() }).then(newest(a, b))
            }
        };
        match self {
            SearchOrder::Newest => hits.sort_by(newest),
            SearchOrder::Oldest => {
                hits.sort_by(|a, b| a.start_ns.cmp(&b.start_ns).then(a.id.cmp(&b.id)))
            }
            SearchOrder::Duration { ascending } => {
                hits.sort_by(by(|t| (t.end_ns - t.start_ns) as f64, ascending))
            }
            SearchOrder::Cost { ascending } => hits.sort_by(by(|t| t.cost_usd, ascending)),
            SearchOrder::Tokens { ascending } => {
                hits.sort_by(by(|t| t.total_tokens as f64, ascending))
            }
            SearchOrder::Spans { ascending } => {
                hits.sort_by(by(|t| t.span_count as f64, ascending))
            }
        }
    }
}

/// What sampling left out of a query's range: the spans stored and the spans decided.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    serde::Serialize,
    schemars::JsonSchema,
    serde::Deserialize,
)]
pub struct SamplingInfo {
    pub kept_spans: u64,
    pub seen_spans: u64,
}

/// A session over a tenant's spans with their sampling weights.
pub(crate) struct WeightedSpans {
    pub ctx: SessionContext,
    /// `SELECT <cols>, w FROM … UNION ALL …` over every span starting in `[$1, $2)`.
    pub sql: String,
    pub sampling: SamplingInfo,
}

/// A table over Parquet files of the store (an empty table when there are none).
fn parquet_table<'a>(
    root: &str,
    paths: impl IntoIterator<Item = &'a str>,
    schema: arrow::datatypes::SchemaRef,
    deleted: &HashSet<[u8; 16]>,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    let urls = paths
        .into_iter()
        .map(|p| ListingTableUrl::parse(format!("{STORE_URL}{root}{p}")))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?));
    }
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    without_deleted(Arc::new(ListingTable::try_new(config)?), deleted)
}

/// An in-memory table (the head) without the rows of deleted traces.
fn mem_table(
    schema: arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    deleted: &HashSet<[u8; 16]>,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    without_deleted(Arc::new(MemTable::try_new(schema, vec![batches])?), deleted)
}

/// `table` without the rows of traces deleted on request (column `trace_id`): a view
/// whose filter DataFusion pushes into every scan, so each query of the tenant skips
/// them without knowing about deletions.
fn without_deleted(
    table: Arc<dyn TableProvider>,
    deleted: &HashSet<[u8; 16]>,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    use datafusion::logical_expr::{LogicalPlanBuilder, col as column, lit};
    if deleted.is_empty() {
        return Ok(table);
    }
    let ids = deleted
        .iter()
        .map(|id| lit(ScalarValue::FixedSizeBinary(16, Some(id.to_vec()))))
        .collect();
    let plan =
        LogicalPlanBuilder::scan("t", datafusion::datasource::provider_as_source(table), None)?
            .filter(column(col::TRACE_ID).in_list(ids, true))?
            .build()?;
    Ok(Arc::new(datafusion::datasource::ViewTable::new(plan, None)))
}

/// Registers the `scores` view: the score files of every block that has scores (a
/// score is about any trace, so no block is left out by time) and the unflushed ones.
fn register_scores(
    root: &str,
    ctx: &SessionContext,
    blocks: &[loupe_core::storage::BlockMeta],
    head: Vec<RecordBatch>,
    deleted: &HashSet<[u8; 16]>,
) -> Result<(), QueryError> {
    let schema = loupe_core::score::score_schema();
    let paths: Vec<String> = blocks
        .iter()
        .filter(|b| b.scores > 0)
        .map(|b| b.scores_path())
        .collect();
    ctx.register_table(
        "score_blocks",
        parquet_table(
            root,
            paths.iter().map(String::as_str),
            schema.clone(),
            deleted,
        )?,
    )?;
    ctx.register_table("score_head", mem_table(schema, head, deleted)?)?;
    Ok(())
}

/// Every score of the tenant, each id once: a replay may have stored a score twice,
/// and a score sent again with its id replaces it (the latest `created_ns` wins).
pub(crate) const SCORES: &str = "(SELECT score_id, \
    last_value(trace_id ORDER BY created_ns) AS trace_id, \
    last_value(span_id ORDER BY created_ns) AS span_id, \
    last_value(name ORDER BY created_ns) AS name, \
    last_value(data_type ORDER BY created_ns) AS data_type, \
    last_value(value ORDER BY created_ns) AS value, \
    last_value(label ORDER BY created_ns) AS label, \
    last_value(source ORDER BY created_ns) AS source, \
    last_value(comment ORDER BY created_ns) AS comment, \
    max(created_ns) AS created_ns \
    FROM (SELECT * FROM score_blocks UNION ALL SELECT * FROM score_head) GROUP BY score_id)";

/// Runs queries; one per process, shared by every request.
pub struct QueryEngine {
    source: Arc<dyn SpanSource>,
    runtime: Arc<RuntimeEnv>,
    config: SessionConfig,
    pub(crate) trace_filters: TraceIdFilters,
    first_round_spans: u64,
    deletions: Deletions,
    /// Where deletion requests are recorded; `None` refuses them.
    deletion_storage: Option<loupe_core::storage::Storage>,
    /// Put before every block path in table URLs (see `Storage::root_store`).
    root: String,
}

impl QueryEngine {
    pub fn new(source: Arc<dyn SpanSource>, storage: &loupe_core::storage::Storage) -> QueryEngine {
        let store = storage.object_store();
        let runtime = RuntimeEnvBuilder::new()
            .build_arc()
            .expect("default runtime env builds");
        let url = url::Url::parse(STORE_URL).expect("static url parses");
        let (root_store, root) = storage.root_store();
        runtime.register_object_store(&url, root_store);
        let mut config = SessionConfig::new()
            .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .with_information_schema(false);
        let opts = config.options_mut();
        opts.execution.parquet.pushdown_filters = true;
        opts.execution.parquet.reorder_filters = true;
        opts.execution.parquet.bloom_filter_on_read = true;
        opts.execution.parquet.enable_page_index = true;
        opts.execution.parquet.schema_force_view_types = false;
        // Per-file statistics would cost a footer read per block at planning time;
        // pruning uses row-group statistics, the page index and bloom filters instead.
        opts.execution.collect_statistics = false;
        QueryEngine {
            source,
            runtime,
            config,
            trace_filters: TraceIdFilters::new(store),
            first_round_spans: FIRST_ROUND_SPANS,
            deletions: Deletions::default(),
            deletion_storage: None,
            root: root.to_owned(),
        }
    }

    /// Hides the traces of these deletion records from every query, and records new
    /// deletion requests in `storage` (see [`loupe_core::deletion`]).
    pub fn with_deletions(
        mut self,
        deletions: Deletions,
        storage: loupe_core::storage::Storage,
    ) -> QueryEngine {
        self.deletions = deletions;
        self.deletion_storage = Some(storage);
        self
    }

    pub(crate) fn deletion_storage(&self) -> Option<&loupe_core::storage::Storage> {
        self.deletion_storage.as_ref()
    }

    /// The deletion records this engine honours.
    pub fn deletions(&self) -> &Deletions {
        &self.deletions
    }

    /// What a query of `tenant` may see now: visible blocks, the head, and the
    /// traces deleted on request (left out of every table).
    pub(crate) fn snapshot(&self, tenant: &TenantId) -> TenantSnapshot {
        let mut snapshot = self.source.snapshot(tenant);
        snapshot.deleted = self.deletions.of(tenant);
        snapshot
    }

    /// Sets how many spans the first round of a search reads (see [`Self::search`]).
    pub fn with_first_round_spans(mut self, spans: u64) -> QueryEngine {
        self.first_round_spans = spans.max(1);
        self
    }

    /// A session whose `spans` table holds exactly this tenant's visible data (blocks
    /// limited to those that may hold spans starting in `range`, when given).
    pub(crate) async fn session(
        &self,
        snapshot: &TenantSnapshot,
        range: Option<(i64, i64)>,
    ) -> Result<SessionContext, QueryError> {
        let ctx = SessionContext::new_with_config_rt(self.config.clone(), self.runtime.clone());
        let schema = span_schema();
        let blocks = snapshot
            .blocks
            .iter()
            .filter(|b| range.is_none_or(|(s, e)| b.overlaps(s, e)))
            .map(|b| b.path.as_str());
        let deleted = &snapshot.deleted;
        ctx.register_table(
            "blocks",
            parquet_table(&self.root, blocks, schema.clone(), deleted)?,
        )?;
        ctx.register_table("head", mem_table(schema, snapshot.head.clone(), deleted)?)?;
        Ok(ctx)
    }

    /// A session whose `blocks` and `head` hold the tenant's spans that may start in
    /// `range`.
    pub(crate) async fn span_session(
        &self,
        tenant: &TenantId,
        range: (i64, i64),
    ) -> Result<SessionContext, QueryError> {
        self.session(&self.snapshot(tenant), Some(range)).await
    }

    /// A session holding only the tenant's `scores`.
    pub(crate) fn score_session(&self, tenant: &TenantId) -> Result<SessionContext, QueryError> {
        let snapshot = self.snapshot(tenant);
        let ctx = SessionContext::new_with_config_rt(self.config.clone(), self.runtime.clone());
        register_scores(
            &self.root,
            &ctx,
            &snapshot.blocks,
            snapshot.head_scores,
            &snapshot.deleted,
        )?;
        Ok(ctx)
    }

    /// A session over the tenant's spans that may start in `range`, for aggregates
    /// that extrapolate sampled-out volume. Blocks are registered in groups of equal
    /// sampling weight ([`BlockMeta::sampling_weight`]); [`WeightedSpans::sql`] is a
    /// `UNION ALL` selecting `cols` and the weight `w` of every span starting in
    /// `[$1, $2)` (the caller's first two parameters).
    pub(crate) async fn weighted_spans(
        &self,
        tenant: &TenantId,
        range: (i64, i64),
        cols: &str,
    ) -> Result<WeightedSpans, QueryError> {
        let snapshot = self.snapshot(tenant);
        // Aggregates keep most rows of their range: filtering while decoding (which
        // decodes the filter's columns twice) costs more than it saves.
        let mut config = self.config.clone();
        config.options_mut().execution.parquet.pushdown_filters = false;
        let ctx = SessionContext::new_with_config_rt(config, self.runtime.clone());
        let schema = span_schema();
        let mut sampling = SamplingInfo::default();
        // Weights are rounded so that blocks of one policy share few tables.
        let mut groups: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for b in snapshot
            .blocks
            .iter()
            .filter(|b| b.spans > 0 && b.overlaps(range.0, range.1))
        {
            sampling.kept_spans += b.spans;
            sampling.seen_spans += b.seen_spans.max(b.spans);
            let w = round_weight(b.sampling_weight());
            groups.entry(w.to_bits()).or_default().push(&b.path);
        }
        let mut parts = Vec::new();
        for (i, (bits, paths)) in groups.into_iter().enumerate() {
            let name = format!("blocks_{i}");
            ctx.register_table(
                &name,
                parquet_table(&self.root, paths, schema.clone(), &snapshot.deleted)?,
            )?;
            parts.push((name, f64::from_bits(bits)));
        }
        let head_rows: u64 = snapshot.head.iter().map(|b| b.num_rows() as u64).sum();
        if head_rows > 0 {
            sampling.kept_spans += head_rows;
            sampling.seen_spans += snapshot.head_seen_spans.max(head_rows);
            let w = round_weight(loupe_core::storage::sampling_weight(
                snapshot.head_seen_spans,
                head_rows,
            ));
            ctx.register_table(
                "head",
                mem_table(schema.clone(), snapshot.head, &snapshot.deleted)?,
            )?;
            parts.push(("head".into(), w));
        }
        if parts.is_empty() {
            ctx.register_table("head", Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
            parts.push(("head".into(), 1.0));
        }
        let sql = parts
            .iter()
            .map(|(table, w)| {
                format!(
                    "SELECT {cols}, CAST({w:?} AS DOUBLE) AS w FROM {table} \
                     WHERE start_ns >= $1 AND start_ns < $2"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        Ok(WeightedSpans { ctx, sql, sampling })
    }

    /// The trace with this id, or `None` when the tenant has no span of it.
    pub async fn trace(
        &self,
        tenant: &TenantId,
        trace_id: [u8; 16],
    ) -> Result<Option<TraceView>, QueryError> {
        let mut snapshot = self.snapshot(tenant);
        if snapshot.deleted.contains(&trace_id) {
            return Ok(None);
        }
        // Scores of a trace may be in any block (written long after the trace).
        let score_blocks: Vec<_> = snapshot
            .blocks
            .iter()
            .filter(|b| b.scores > 0)
            .cloned()
            .collect();
        snapshot.blocks = self
            .trace_filters
            .candidates(std::mem::take(&mut snapshot.blocks), &trace_id)
            .await;
        // The head is many small batches in arrival order; only the few that hold this
        // trace are worth handing to the query engine.
        snapshot.head.retain(|b| {
            let ids = b.column(0).as_fixed_size_binary();
            (0..ids.len()).any(|i| ids.value(i) == trace_id)
        });
        let ctx = self.session(&snapshot, None).await?;
        let id = ScalarValue::FixedSizeBinary(16, Some(trace_id.to_vec()));
        let batches = run(
            &ctx,
            "SELECT * FROM blocks WHERE trace_id = $1 \
                 UNION ALL SELECT * FROM head WHERE trace_id = $1",
            vec![id],
        )
        .await?;
        let spans = rows_to_spans(&batches)?;
        if spans.is_empty() {
            return Ok(None);
        }
        let mut view = build_trace(hex(&trace_id), spans);
        register_scores(
            &self.root,
            &ctx,
            &score_blocks,
            snapshot.head_scores,
            &snapshot.deleted,
        )?;
        view.scores = self.trace_scores(&ctx, trace_id).await?;
        Ok(Some(view))
    }

    /// Distinct values of a span column among spans starting in `[start_ns, end_ns)`,
    /// sorted, at most `limit`. `column` must be one of [`loupe_core::span::col`].
    pub async fn distinct_values(
        &self,
        tenant: &TenantId,
        column: &'static str,
        (start_ns, end_ns): (i64, i64),
        limit: usize,
    ) -> Result<Vec<String>, QueryError> {
        if span_schema().field_with_name(column).is_err() {
            return Err(QueryError::Internal(format!("no span column {column}")));
        }
        let ctx = self
            .session(&self.snapshot(tenant), Some((start_ns, end_ns)))
            .await?;
        let sql = format!(
            "SELECT DISTINCT CAST({column} AS VARCHAR) AS v FROM (\
               SELECT {column} FROM blocks WHERE start_ns >= $1 AND start_ns < $2 \
               UNION ALL SELECT {column} FROM head WHERE start_ns >= $1 AND start_ns < $2) \
             WHERE {column} IS NOT NULL ORDER BY v LIMIT $3"
        );
        let batches = run(
            &ctx,
            &sql,
            vec![
                ScalarValue::Int64(Some(start_ns)),
                ScalarValue::Int64(Some(end_ns)),
                ScalarValue::Int64(Some(limit as i64)),
            ],
        )
        .await?;
        let mut out = Vec::new();
        for b in &batches {
            let v = strings(b, "v")?;
            out.extend((0..b.num_rows()).filter_map(|r| opt_str(&v, r)));
        }
        Ok(out)
    }

    /// Trace summaries matching the query, newest first (ties by trace id).
    ///
    /// Blocks are read newest first, in rounds that each read about four times more
    /// spans than the last, until the page cannot change. Let `M` be the latest span
    /// start in the blocks not read yet: a trace starting after `M` has all its spans
    /// in the blocks read, so once `limit` traces starting after `M` match, older
    /// blocks can neither add nor displace one. A trace of the page that may also have
    /// spans in an unread block (one within [`TRACE_SLACK_NS`] of it whose trace-id
    /// filter admits it) is summed again over those blocks first. A search for recent
    /// traces reads a few blocks; one that matches nothing reads every block of its
    /// range (about a third more spans in all than one pass would).
    pub async fn search(
        &self,
        tenant: &TenantId,
        q: &SearchQuery,
    ) -> Result<SearchResponse, QueryError> {
        check_range(q.start_ns, q.end_ns)?;
        let scan = (
            q.start_ns.saturating_sub(TRACE_SLACK_NS),
            q.end_ns.saturating_add(TRACE_SLACK_NS),
        );
        let snapshot = self.snapshot(tenant);
        let mut blocks: Vec<&BlockMeta> = snapshot
            .blocks
            .iter()
            .filter(|b| b.overlaps(scan.0, scan.1))
            .collect();
        blocks.sort_by_key(|b| std::cmp::Reverse(b.max_start_ns));
        // Only the newest-first order can stop before the range's oldest block.
        let first_round = match q.order {
            SearchOrder::Newest => self.first_round_spans,
            _ => u64::MAX,
        };
        let (mut read, mut read_spans, mut budget) = (0, 0u64, first_round);
        let traces = loop {
            while read < blocks.len() && (read_spans < budget || read == 0) {
                read_spans += blocks[read].spans;
                read += 1;
            }
            let (done, unread) = blocks.split_at(read);
            let mut page = self.search_blocks(&snapshot, done, q, scan, &[]).await?;
            let Some(unread_max_start) = unread.first().map(|b| b.max_start_ns) else {
                break page;
            };
            // Traces of the page that may continue in unread blocks are summed again
            // with those blocks.
            let mut suspects = Vec::new();
            let mut extra: Vec<&BlockMeta> = Vec::new();
            for t in &page {
                let near: Vec<BlockMeta> = unread
                    .iter()
                    .filter(|b| b.max_start_ns >= t.start_ns.saturating_sub(TRACE_SLACK_NS))
                    .map(|b| (*b).clone())
                    .collect();
                if near.is_empty() {
                    continue;
                }
                let found = self.trace_filters.candidates(near, &t.id).await;
                if !found.is_empty() {
                    suspects.push(t.id);
                    for b in found {
                        if !extra.iter().any(|e| e.path == b.path) {
                            extra.extend(unread.iter().find(|u| u.path == b.path));
                        }
                    }
                }
            }
            if !suspects.is_empty() {
                let mut with: Vec<&BlockMeta> = done.to_vec();
                with.extend(extra);
                let exact = self
                    .search_blocks(&snapshot, &with, q, scan, &suspects)
                    .await?;
                page.retain(|t| !suspects.contains(&t.id));
                page.extend(exact);
                q.order.sort(&mut page);
            }
            let settled = page
                .iter()
                .take_while(|t| t.start_ns > unread_max_start)
                .count();
            if settled >= q.limit {
                page.truncate(q.limit);
                break page;
            }
            budget = budget.saturating_mul(4);
        };
        Ok(SearchResponse {
            traces: traces.into_iter().map(|t| t.summary).collect(),
            start_ns: q.start_ns,
            end_ns: q.end_ns,
            limit: q.limit,
        })
    }

    /// One search over `blocks` and the head (only over traces `only`, when given).
    async fn search_blocks(
        &self,
        snapshot: &TenantSnapshot,
        blocks: &[&BlockMeta],
        q: &SearchQuery,
        scan: (i64, i64),
        only: &[[u8; 16]],
    ) -> Result<Vec<Hit>, QueryError> {
        let round = TenantSnapshot {
            blocks: blocks.iter().map(|b| (*b).clone()).collect(),
            head: snapshot.head.clone(),
            deleted: snapshot.deleted.clone(),
            ..TenantSnapshot::default()
        };
        let ctx = self.session(&round, None).await?;
        if !q.scores.is_empty() {
            register_scores(
                &self.root,
                &ctx,
                &snapshot.blocks,
                snapshot.head_scores.clone(),
                &snapshot.deleted,
            )?;
        }
        // Traces that cannot match are left out before spans are grouped; when few
        // remain, only their spans are decoded (their ids filter the scan).
        let mut only = only.to_vec();
        if only.is_empty()
            && let Some((sql, params)) = narrowing_sql(q, scan)
        {
            let mut ids = Vec::new();
            for b in run(&ctx, &sql, params).await? {
                let col = b.column(0).as_fixed_size_binary();
                ids.extend(
                    col.iter()
                        .flatten()
                        .filter_map(|v| <[u8; 16]>::try_from(v).ok()),
                );
            }
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            if ids.len() <= MAX_NARROWED_TRACES {
                only = ids;
            }
        }
        let (sql, params) = search_sql(q, scan, &only);
        let batches = run(&ctx, &sql, params).await?;
        let mut traces = Vec::new();
        for b in &batches {
            let ids = b.column(0).as_fixed_size_binary();
            let root_name = strings(b, "root_name")?;
            let root_service = strings(b, "root_service")?;
            let (users, sessions) = (strings(b, "user_id")?, strings(b, "session_id")?);
            let i = |name| ints(b, name);
            let (start, end, count) = (i("start_ns")?, i("end_ns")?, i("span_count")?);
            let (tin, tout, ttot) = (i("input_tokens")?, i("output_tokens")?, i("total_tokens")?);
            let err = i("is_error")?;
            let cost = floats(b, "cost_usd")?;
            for r in 0..b.num_rows() {
                let s = start.value(r);
                let e = end.value(r);
                let id: [u8; 16] = ids
                    .value(r)
                    .try_into()
                    .map_err(|_| QueryError::Internal("trace id of a wrong size".into()))?;
                traces.push(Hit {
                    id,
                    start_ns: s,
                    summary: TraceSummary {
                        trace_id: hex(&id),
                        totals: TraceTotals {
                            root_name: opt_str(&root_name, r).unwrap_or_default(),
                            root_service: opt_str(&root_service, r).unwrap_or_default(),
                            start_time: rfc3339(s),
                            start_ns: s,
                            end_ns: e,
                            duration_ms: ms(e - s),
                            span_count: count.value(r).max(0) as u64,
                            input_tokens: opt_i64(&tin, r).unwrap_or(0),
                            output_tokens: opt_i64(&tout, r).unwrap_or(0),
                            total_tokens: opt_i64(&ttot, r).unwrap_or(0),
                            cost_usd: opt_f64(&cost, r).unwrap_or(0.0),
                            error: err.value(r) > 0,
                            user_id: opt_str(&users, r),
                            session_id: opt_str(&sessions, r),
                        },
                    },
                });
            }
        }
        Ok(traces)
    }
}

/// One trace a search found.
struct Hit {
    id: [u8; 16],
    start_ns: i64,
    summary: TraceSummary,
}

/// Collects SQL parameters: each value becomes the next placeholder (`$1`, `$2`, …).
#[derive(Default)]
pub(crate) struct Params(pub(crate) Vec<ScalarValue>);

impl Params {
    pub(crate) fn push(&mut self, v: ScalarValue) -> String {
        self.0.push(v);
        format!("${}", self.0.len())
    }
    pub(crate) fn text(&mut self, s: &str) -> String {
        self.push(ScalarValue::Utf8(Some(s.to_owned())))
    }
    pub(crate) fn int(&mut self, v: i64) -> String {
        self.push(ScalarValue::Int64(Some(v)))
    }
}

/// A search's span-level conditions (a trace matches when, for each, one of its spans
/// does); values become parameters through `p`.
fn span_conditions(q: &SearchQuery, p: &mut Params) -> Vec<String> {
    let mut conds: Vec<String> = Vec::new();
    if let Some(v) = &q.service {
        conds.push(format!("{} = {}", col::SERVICE_NAME, p.text(v)));
    }
    if let Some(v) = &q.name {
        conds.push(format!("{} = {}", col::NAME, p.text(v)));
    }
    if let Some(k) = q.llm_kind {
        conds.push(format!("{} = {}", col::LLM_KIND, p.text(k.as_str())));
    }
    if let Some(v) = &q.model {
        let m = p.text(v);
        conds.push(format!(
            "({} = {m} OR {} = {m})",
            col::REQUEST_MODEL,
            col::RESPONSE_MODEL
        ));
    }
    for (column, v) in [
        (col::USER_ID, &q.user_id),
        (col::SESSION_ID, &q.session_id),
        (col::PROMPT_NAME, &q.prompt_name),
        (col::PROMPT_VERSION, &q.prompt_version),
    ] {
        if let Some(v) = v {
            conds.push(format!("{column} = {}", p.text(v)));
        }
    }
    conds
}

/// The ids of traces that have, for every span-level condition of the search (and an
/// error, for `status=error`), a span meeting it; `None` when the search has no such
/// condition. Reads only the conditions' columns and the trace id.
fn narrowing_sql(q: &SearchQuery, scan: (i64, i64)) -> Option<(String, Vec<ScalarValue>)> {
    let mut p = Params::default();
    let scan_start = p.int(scan.0);
    let scan_end = p.int(scan.1);
    let mut conds = span_conditions(q, &mut p);
    if q.status == Some(StatusFilter::Error) {
        conds.push(format!("{} = 'ERROR'", col::STATUS));
    }
    if conds.is_empty() {
        return None;
    }
    let range = format!("start_ns >= {scan_start} AND start_ns < {scan_end}");
    let sql = conds
        .iter()
        .map(|c| {
            format!(
                "(SELECT trace_id FROM blocks WHERE {range} AND {c} \
                 UNION SELECT trace_id FROM head WHERE {range} AND {c})"
            )
        })
        .collect::<Vec<_>>()
        .join(" INTERSECT ");
    Some((sql, p.0))
}

/// Builds the search SQL and its parameters.
///
/// Duplicated spans (a client retry, a replay) are folded first by (trace_id,
/// span_id); then spans are grouped into traces; then trace-level filters apply.
fn search_sql(q: &SearchQuery, scan: (i64, i64), only: &[[u8; 16]]) -> (String, Vec<ScalarValue>) {
    let mut p = Params::default();
    let scan_start = p.int(scan.0);
    let scan_end = p.int(scan.1);
    let mut span_where = format!("start_ns >= {scan_start} AND start_ns < {scan_end}");
    if !only.is_empty() {
        let ids: Vec<String> = only
            .iter()
            .map(|id| p.push(ScalarValue::FixedSizeBinary(16, Some(id.to_vec()))))
            .collect();
        span_where.push_str(&format!(" AND trace_id IN ({})", ids.join(", ")));
    }

    // Span-level conditions, each turned into a per-trace "some span matches" flag.
    let span_conds = span_conditions(q, &mut p);
    let flag_cols: String = span_conds
        .iter()
        .enumerate()
        .map(|(i, c)| format!(", max(CASE WHEN {c} THEN 1 ELSE 0 END) AS m{i}"))
        .collect();
    let flag_aggs: String = (0..span_conds.len())
        .map(|i| format!(", max(m{i}) AS m{i}"))
        .collect();

    let mut trace_conds = vec![
        format!("start_ns >= {}", p.int(q.start_ns)),
        format!("start_ns < {}", p.int(q.end_ns)),
    ];
    trace_conds.extend((0..span_conds.len()).map(|i| format!("m{i} = 1")));
    match q.status {
        Some(StatusFilter::Error) => trace_conds.push("is_error = 1".into()),
        Some(StatusFilter::Ok) => trace_conds.push("is_error = 0".into()),
        None => {}
    }
    if let Some(v) = q.min_duration_ns {
        trace_conds.push(format!("end_ns - start_ns >= {}", p.int(v)));
    }
    if let Some(v) = q.max_duration_ns {
        trace_conds.push(format!("end_ns - start_ns <= {}", p.int(v)));
    }
    if let Some(v) = q.min_cost_usd {
        trace_conds.push(format!(
            "coalesce(cost_usd, 0) >= {}",
            p.push(ScalarValue::Float64(Some(v)))
        ));
    }
    let limit = p.int(q.limit as i64);
    if !q.scores.is_empty() {
        trace_conds.push(crate::scores::score_filter_sql(&q.scores, &mut p));
    }

    let sql = format!(
        "WITH spans AS (\
            SELECT * FROM blocks WHERE {span_where} \
            UNION ALL \
            SELECT * FROM head WHERE {span_where}), \
         dedup AS (\
            SELECT trace_id, span_id, \
              max(CASE WHEN parent_span_id IS NULL THEN 1 ELSE 0 END) AS is_root, \
              max(name) AS name, max(service_name) AS service_name, \
              min(start_ns) AS start_ns, max(end_ns) AS end_ns, \
              max(CASE WHEN status = 'ERROR' THEN 1 ELSE 0 END) AS is_error, \
              max(input_tokens) AS input_tokens, max(output_tokens) AS output_tokens, \
              max(total_tokens) AS total_tokens, max(cost_total_usd) AS cost_total_usd, \
              max(user_id) AS user_id, max(session_id) AS session_id \
              {flag_cols} \
            FROM spans GROUP BY trace_id, span_id), \
         traces AS (\
            SELECT trace_id, min(start_ns) AS start_ns, max(end_ns) AS end_ns, \
              count(*) AS span_count, \
              coalesce(max(CASE WHEN is_root = 1 THEN name END), first_value(name ORDER BY start_ns)) AS root_name, \
              coalesce(max(CASE WHEN is_root = 1 THEN service_name END), first_value(service_name ORDER BY start_ns)) AS root_service, \
              sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
              sum(total_tokens) AS total_tokens, sum(cost_total_usd) AS cost_usd, \
              max(is_error) AS is_error, \
              coalesce(max(CASE WHEN is_root = 1 THEN user_id END), max(user_id)) AS user_id, \
              coalesce(max(CASE WHEN is_root = 1 THEN session_id END), max(session_id)) AS session_id \
              {flag_aggs} \
            FROM dedup GROUP BY trace_id) \
         SELECT trace_id, start_ns, end_ns, span_count, root_name, root_service, \
           input_tokens, output_tokens, total_tokens, cost_usd, is_error, user_id, session_id \
         FROM traces WHERE {} \
         ORDER BY {} LIMIT {limit}",
        trace_conds.join(" AND "),
        q.order.sql()
    );
    (sql, p.0)
}

pub(crate) fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, QueryError> {
    b.column_by_name(name)
        .ok_or_else(|| QueryError::Internal(format!("result has no column {name}")))
}

pub(crate) fn strings(b: &RecordBatch, name: &str) -> Result<ArrayRef, QueryError> {
    Ok(cast(column(b, name)?, &DataType::Utf8)?)
}

pub(crate) fn ints(b: &RecordBatch, name: &str) -> Result<arrow::array::Int64Array, QueryError> {
    Ok(cast(column(b, name)?, &DataType::Int64)?
        .as_primitive::<Int64Type>()
        .clone())
}

pub(crate) fn floats(
    b: &RecordBatch,
    name: &str,
) -> Result<arrow::array::Float64Array, QueryError> {
    Ok(cast(column(b, name)?, &DataType::Float64)?
        .as_primitive::<Float64Type>()
        .clone())
}

/// Runs a query with its parameters and collects the result.
pub(crate) async fn run(
    ctx: &SessionContext,
    sql: &str,
    params: Vec<ScalarValue>,
) -> Result<Vec<RecordBatch>, QueryError> {
    Ok(ctx
        .sql(sql)
        .await?
        .with_param_values(params)?
        .collect()
        .await?)
}

/// Refuses a range whose end is not after its start.
pub(crate) fn check_range(start_ns: i64, end_ns: i64) -> Result<(), QueryError> {
    if end_ns <= start_ns {
        return Err(QueryError::BadRequest(format!(
            "empty time range: end ({}) is not after start ({})",
            rfc3339(end_ns),
            rfc3339(start_ns)
        )));
    }
    Ok(())
}

pub(crate) fn opt_str(a: &ArrayRef, r: usize) -> Option<String> {
    let a = a.as_string::<i32>();
    (!a.is_null(r)).then(|| a.value(r).to_owned())
}

pub(crate) fn opt_i64(a: &arrow::array::Int64Array, r: usize) -> Option<i64> {
    (!a.is_null(r)).then(|| a.value(r))
}

pub(crate) fn opt_f64(a: &arrow::array::Float64Array, r: usize) -> Option<f64> {
    (!a.is_null(r)).then(|| a.value(r))
}

pub use loupe_core::ids::to_hex as hex;

fn json(a: &ArrayRef, r: usize, default: serde_json::Value) -> serde_json::Value {
    opt_str(a, r)
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(default)
}

/// Converts span rows into flat nodes, keeping the first copy of a duplicated span.
fn rows_to_spans(batches: &[RecordBatch]) -> Result<Vec<SpanNode>, QueryError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for b in batches {
        let span_ids = column(b, col::SPAN_ID)?.as_fixed_size_binary().clone();
        let parents = column(b, col::PARENT_SPAN_ID)?
            .as_fixed_size_binary()
            .clone();
        let s = |name| strings(b, name);
        let (name, service, span_kind, llm_kind, status, status_message) = (
            s(col::NAME)?,
            s(col::SERVICE_NAME)?,
            s(col::SPAN_KIND)?,
            s(col::LLM_KIND)?,
            s(col::STATUS)?,
            s(col::STATUS_MESSAGE)?,
        );
        let (provider, req_model, resp_model, cost_source, finish) = (
            s(col::PROVIDER)?,
            s(col::REQUEST_MODEL)?,
            s(col::RESPONSE_MODEL)?,
            s(col::COST_SOURCE)?,
            s(col::FINISH_REASON)?,
        );
        let (user, session, prompt_name, prompt_version, env, input, output) = (
            s(col::USER_ID)?,
            s(col::SESSION_ID)?,
            s(col::PROMPT_NAME)?,
            s(col::PROMPT_VERSION)?,
            s(col::ENVIRONMENT)?,
            s(col::INPUT)?,
            s(col::OUTPUT)?,
        );
        let (attrs, resource, scope, events, links) = (
            s(col::ATTRIBUTES)?,
            s(col::RESOURCE)?,
            s(col::SCOPE)?,
            s(col::EVENTS)?,
            s(col::LINKS)?,
        );
        let i = |name| ints(b, name);
        let (start, end) = (i(col::START_NS)?, i(col::END_NS)?);
        let (tin, tout, ttot, tcache, treason) = (
            i(col::INPUT_TOKENS)?,
            i(col::OUTPUT_TOKENS)?,
            i(col::TOTAL_TOKENS)?,
            i(col::CACHE_READ_TOKENS)?,
            i(col::REASONING_TOKENS)?,
        );
        let (cin, cout, ctot) = (
            floats(b, col::COST_INPUT_USD)?,
            floats(b, col::COST_OUTPUT_USD)?,
            floats(b, col::COST_TOTAL_USD)?,
        );
        for r in 0..b.num_rows() {
            let span_id = hex(span_ids.value(r));
            if !seen.insert(span_id.clone()) {
                continue;
            }
            let (st, en) = (start.value(r), end.value(r));
            out.push(SpanNode {
                span_id,
                parent_span_id: (!parents.is_null(r)).then(|| hex(parents.value(r))),
                name: opt_str(&name, r).unwrap_or_default(),
                service_name: opt_str(&service, r).unwrap_or_default(),
                span_kind: opt_str(&span_kind, r).unwrap_or_default(),
                llm_kind: opt_str(&llm_kind, r).unwrap_or_default(),
                start_ns: st,
                end_ns: en,
                duration_ms: ms(en - st),
                status: opt_str(&status, r).unwrap_or_default(),
                status_message: opt_str(&status_message, r),
                provider: opt_str(&provider, r),
                request_model: opt_str(&req_model, r),
                response_model: opt_str(&resp_model, r),
                input_tokens: opt_i64(&tin, r),
                output_tokens: opt_i64(&tout, r),
                total_tokens: opt_i64(&ttot, r),
                cache_read_tokens: opt_i64(&tcache, r),
                reasoning_tokens: opt_i64(&treason, r),
                cost_input_usd: opt_f64(&cin, r),
                cost_output_usd: opt_f64(&cout, r),
                cost_total_usd: opt_f64(&ctot, r),
                cost_source: opt_str(&cost_source, r),
                finish_reason: opt_str(&finish, r),
                user_id: opt_str(&user, r),
                session_id: opt_str(&session, r),
                prompt_name: opt_str(&prompt_name, r),
                prompt_version: opt_str(&prompt_version, r),
                environment: opt_str(&env, r),
                input: opt_str(&input, r),
                output: opt_str(&output, r),
                attributes: json(&attrs, r, serde_json::json!({})),
                resource: json(&resource, r, serde_json::json!({})),
                scope: json(&scope, r, serde_json::json!({})),
                events: json(&events, r, serde_json::json!([])),
                links: json(&links, r, serde_json::json!([])),
                children: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// Nests spans under their parents (children by start time) and sums the totals.
pub fn build_trace(trace_id: String, spans: Vec<SpanNode>) -> TraceView {
    let mut totals = TraceTotals {
        start_ns: i64::MAX,
        end_ns: i64::MIN,
        span_count: spans.len() as u64,
        ..TraceTotals::default()
    };
    for s in &spans {
        totals.start_ns = totals.start_ns.min(s.start_ns);
        totals.end_ns = totals.end_ns.max(s.end_ns);
        totals.input_tokens += s.input_tokens.unwrap_or(0);
        totals.output_tokens += s.output_tokens.unwrap_or(0);
        totals.total_tokens += s.total_tokens.unwrap_or(0);
        totals.cost_usd += s.cost_total_usd.unwrap_or(0.0);
        totals.error |= s.status == "ERROR";
    }
    totals.duration_ms = ms(totals.end_ns - totals.start_ns);
    totals.start_time = rfc3339(totals.start_ns);
    // The root's user and session, else any span's (as searches report them).
    let pick = |f: fn(&SpanNode) -> &Option<String>| {
        let roots = spans.iter().filter(|s| s.parent_span_id.is_none());
        roots
            .filter_map(|s| f(s).clone())
            .max()
            .or_else(|| spans.iter().filter_map(|s| f(s).clone()).max())
    };
    totals.user_id = pick(|s| &s.user_id);
    totals.session_id = pick(|s| &s.session_id);

    let ids: HashSet<String> = spans.iter().map(|s| s.span_id.clone()).collect();
    let mut children: HashMap<String, Vec<SpanNode>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        match &s.parent_span_id {
            Some(p) if ids.contains(p) && p != &s.span_id => {
                children.entry(p.clone()).or_default().push(s)
            }
            _ => roots.push(s),
        }
    }
    fn attach(node: &mut SpanNode, children: &mut HashMap<String, Vec<SpanNode>>, depth: usize) {
        // Parent links come from clients: a cycle must not recurse forever.
        if depth > 10_000 {
            return;
        }
        if let Some(mut kids) = children.remove(&node.span_id) {
            for k in &mut kids {
                attach(k, children, depth + 1);
            }
            kids.sort_by(|a, b| (a.start_ns, &a.span_id).cmp(&(b.start_ns, &b.span_id)));
            node.children = kids;
        }
    }
    for r in &mut roots {
        attach(r, &mut children, 0);
    }
    // Spans left over sit on a parent cycle: show them as roots rather than lose them.
    for (_, mut rest) in children.drain() {
        roots.append(&mut rest);
    }
    roots.sort_by(|a, b| (a.start_ns, &a.span_id).cmp(&(b.start_ns, &b.span_id)));
    if let Some(root) = roots.first() {
        totals.root_name = root.name.clone();
        totals.root_service = root.service_name.clone();
    }
    TraceView {
        trace_id,
        summary: totals,
        roots,
        scores: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_rounded_to_four_significant_digits() {
        assert_eq!(round_weight(0.5), 1.0);
        assert_eq!(round_weight(f64::NAN), 1.0);
        assert_eq!(round_weight(4.56789), 4.568);
        assert_eq!(round_weight(123.456), 123.5);
    }

    fn node(id: &str, parent: Option<&str>, start: i64) -> SpanNode {
        SpanNode {
            input_tokens: Some(1),
            output_tokens: Some(2),
            total_tokens: Some(3),
            cost_total_usd: Some(0.5),
            ..SpanNode::test(id, parent, start, start + 10)
        }
    }

    #[test]
    fn nests_children_by_start_and_sums_totals() {
        let spans = vec![
            node("c2", Some("r"), 30),
            node("r", None, 0),
            node("c1", Some("r"), 20),
            node("g", Some("c1"), 25),
        ];
        let t = build_trace("t".into(), spans);
        assert_eq!(t.roots.len(), 1);
        let r = &t.roots[0];
        assert_eq!(r.span_id, "r");
        let kids: Vec<_> = r.children.iter().map(|c| c.span_id.as_str()).collect();
        assert_eq!(kids, ["c1", "c2"]);
        assert_eq!(r.children[0].children[0].span_id, "g");
        assert_eq!(t.summary.span_count, 4);
        assert_eq!(t.summary.total_tokens, 12);
        assert!((t.summary.cost_usd - 2.0).abs() < 1e-9);
        assert_eq!(t.summary.root_name, "span-r");
        assert_eq!(t.summary.duration_ms, ms(40));
    }

    #[test]
    fn orphans_and_cycles_become_roots_instead_of_vanishing() {
        let spans = vec![
            node("a", Some("missing"), 5),
            node("x", Some("y"), 1),
            node("y", Some("x"), 2),
        ];
        let t = build_trace("t".into(), spans);
        let mut all = Vec::new();
        fn walk(n: &SpanNode, out: &mut Vec<String>) {
            out.push(n.span_id.clone());
            n.children.iter().for_each(|c| walk(c, out));
        }
        t.roots.iter().for_each(|r| walk(r, &mut all));
        all.sort();
        assert_eq!(all, ["a", "x", "y"]);
    }

    #[test]
    fn search_sql_carries_values_only_as_parameters() {
        let q = SearchQuery {
            start_ns: 0,
            end_ns: 10,
            user_id: Some("x' OR 1=1 --".into()),
            model: Some("gpt-4o".into()),
            limit: 5,
            ..SearchQuery::default()
        };
        let (sql, params) = search_sql(&q, (0, 10), &[]);
        assert!(!sql.contains("OR 1=1"));
        assert!(!sql.contains("gpt-4o"));
        assert!(params.contains(&ScalarValue::Utf8(Some("x' OR 1=1 --".into()))));
    }
}

#[cfg(test)]
mod search_rounds {
    use super::*;
    use crate::index::StorageIndex;
    use loupe_core::SpanRecord;
    use loupe_core::span::{StatusCode, spans_to_batch};
    use loupe_core::storage::Storage;

    const S: u64 = 1_000_000_000;

    fn span(trace: u8, id: u8, parent: Option<u8>, start_s: u64) -> SpanRecord {
        SpanRecord {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: if parent.is_none() { "root" } else { "llm" }.into(),
            service_name: "svc".into(),
            start_ns: start_s * S,
            end_ns: start_s * S + S / 2,
            status: StatusCode::Ok as i32,
            ..Default::default()
        }
    }

    /// Six blocks of ten traces each, an hour apart, newest last; trace 200 starts in
    /// block 4 and ends in block 5 (its error child arrived in the newer block).
    async fn engines() -> (QueryEngine, QueryEngine, TenantId, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let tenant: TenantId = "ns/p".parse().unwrap();
        for block in 0..6u64 {
            let base = 100_000 + block * 3_600;
            let mut spans = Vec::new();
            for t in 0..10u8 {
                let trace = block as u8 * 10 + t + 1;
                spans.push(span(trace, 1, None, base + t as u64 * 60));
                let mut child = span(trace, 2, Some(1), base + t as u64 * 60 + 5);
                if t == 3 {
                    child.status = StatusCode::Error as i32;
                    child.response_model = Some("gpt-4o".into());
                }
                spans.push(child);
            }
            if block == 4 {
                spans.push(span(200, 1, None, base + 3_590));
            }
            if block == 5 {
                let mut child = span(200, 2, Some(1), base - 10 + 600);
                child.status = StatusCode::Error as i32;
                spans.push(child);
            }
            let job = loupe_ingester::writer::BlockJob::new(
                tenant.clone(),
                block,
                block,
                vec![spans_to_batch(&spans).unwrap()],
                0,
                0,
            );
            loupe_ingester::block::write(&storage, "t", &job)
                .await
                .unwrap();
        }
        let index = StorageIndex::new(storage.clone());
        index.refresh().await.unwrap();
        let source: Arc<dyn SpanSource> = Arc::new(index);
        let one_pass = QueryEngine::new(source.clone(), &storage);
        let rounds = QueryEngine::new(source, &storage).with_first_round_spans(1);
        (one_pass, rounds, tenant, dir)
    }

    #[tokio::test]
    async fn reading_blocks_newest_first_gives_the_page_of_one_pass() {
        let (one_pass, rounds, tenant, _dir) = engines().await;
        let base = SearchQuery {
            start_ns: 0,
            end_ns: 1_000_000 * S as i64,
            limit: 5,
            ..SearchQuery::default()
        };
        let queries = [
            base.clone(),
            SearchQuery {
                limit: 1000,
                ..base.clone()
            },
            SearchQuery {
                limit: 12,
                ..base.clone()
            },
            SearchQuery {
                status: Some(StatusFilter::Error),
                ..base.clone()
            },
            SearchQuery {
                model: Some("gpt-4o".into()),
                limit: 3,
                ..base.clone()
            },
            SearchQuery {
                service: Some("nobody".into()),
                ..base.clone()
            },
        ];
        for q in &queries {
            let want = one_pass.search(&tenant, q).await.unwrap();
            let got = rounds.search(&tenant, q).await.unwrap();
            assert_eq!(got, want, "{q:?}");
        }
        // The trace split across blocks is summed whole, at its root's start.
        let errors = rounds.search(&tenant, &queries[3]).await.unwrap();
        let split = errors
            .traces
            .iter()
            .find(|t| t.trace_id == hex(&[200; 16]))
            .expect("the split trace is found");
        assert_eq!(split.totals.span_count, 2);
        assert_eq!(
            split.totals.start_ns,
            (100_000 + 4 * 3_600 + 3_590) * S as i64
        );
        assert_eq!(errors.traces.len(), 5);
        let all = rounds.search(&tenant, &queries[1]).await.unwrap();
        assert_eq!(all.traces.len(), 61);
        assert!(
            all.traces
                .windows(2)
                .all(|w| w[0].totals.start_ns >= w[1].totals.start_ns)
        );

        // Other orders read every block of the range: the top of the whole range,
        // the same as sorting everything and cutting.
        for order in [
            SearchOrder::Oldest,
            SearchOrder::Duration { ascending: false },
            SearchOrder::Duration { ascending: true },
            SearchOrder::Spans { ascending: false },
        ] {
            let q = SearchQuery {
                order,
                limit: 4,
                ..base.clone()
            };
            let got = rounds.search(&tenant, &q).await.unwrap();
            let mut want: Vec<_> = all.traces.clone();
            let key = |t: &TraceSummary| match order {
                SearchOrder::Oldest => (t.totals.start_ns, std::cmp::Reverse(0)),
                SearchOrder::Duration { ascending: true } => (
                    t.totals.end_ns - t.totals.start_ns,
                    std::cmp::Reverse(t.totals.start_ns),
                ),
                SearchOrder::Duration { .. } => (
                    -(t.totals.end_ns - t.totals.start_ns),
                    std::cmp::Reverse(t.totals.start_ns),
                ),
                _ => (
                    -(t.totals.span_count as i64),
                    std::cmp::Reverse(t.totals.start_ns),
                ),
            };
            want.sort_by_key(|t| (key(t), t.trace_id.clone()));
            want.truncate(4);
            assert_eq!(got.traces, want, "{order:?}");
        }
        assert_eq!(
            SearchOrder::parse("cost:asc"),
            Ok(SearchOrder::Cost { ascending: true })
        );
        assert!(SearchOrder::parse("newest:asc").is_err());
        assert!(
            SearchOrder::parse("price")
                .unwrap_err()
                .contains("newest, oldest, duration")
        );
    }
}
