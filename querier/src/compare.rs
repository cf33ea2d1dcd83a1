//! Side-by-side comparison of two traces, for `GET /api/v1/compare?a=<trace>&b=<trace>`.
//!
//! # Alignment
//!
//! Two spans are aligned when they sit at the same place in their trees, where a
//! place is the path of span names from the top plus, at every level, the span's
//! occurrence index among its siblings of the same name. In
//!
//! ```text
//! agent ─┬─ llm            agent#0/llm#0
//!        ├─ tool.search    agent#0/tool.search#0
//!        └─ llm            agent#0/llm#1
//! ```
//!
//! the second `llm` is `llm#1` whatever other siblings lie between the two, so an
//! extra tool call in one trace leaves the later spans aligned, and the iterations of
//! an agent loop pair up by order. Siblings are taken in start order (as
//! [`SpanNode::children`] holds them); several roots are siblings at the top level,
//! ordered by start. Alignment is done level by level: a span whose place exists in
//! only one trace is reported with its whole subtree as present in only that trace.
//!
//! The `path` shown for a span spells its place: segments `name#index` joined by
//! `/`, with `%`, `/` and `#` in names percent-encoded so that they cannot be read
//! as separators. Paths are bounded in length: past [`MAX_PATH_BYTES`] leading
//! segments give way to a `…` segment (the alignment itself never depends on the
//! text of a path).
//!
//! Both trees are walked with explicit stacks, so deep traces cannot overflow the
//! call stack, and the work is linear in the number of spans.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{SpanNode, TraceView};

/// Longest path text reported for a span, in bytes (except when the span's own
/// name is longer still).
pub const MAX_PATH_BYTES: usize = 1024;

/// Output texts are reported up to this many characters.
pub const MAX_TEXT_CHARS: usize = 2000;

/// The common prefix of two output texts is measured up to this many characters.
pub const MAX_PREFIX_SCAN_CHARS: usize = 100_000;

/// Costs closer than this are equal: the same price can be summed in a different
/// order and differ in the last bits.
const COST_EPSILON_USD: f64 = 1e-12;

/// Marks the leading path segments left out of a long path.
const ELIDED: &str = "…/";

/// The comparison of trace `a` with trace `b`.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct Comparison {
    pub a: TraceSide,
    pub b: TraceSide,
    pub totals_diff: TotalsDiff,
    /// Spans present in both traces, in the pre-order of `a`.
    pub aligned: Vec<AlignedSpan>,
    /// Spans present only in `a`, in the pre-order of `a`.
    pub only_in_a: Vec<SpanRef>,
    /// Spans present only in `b`, in the pre-order of `b`.
    pub only_in_b: Vec<SpanRef>,
}

/// The totals of one of the compared traces.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct TraceSide {
    pub trace_id: String,
    pub root_name: String,
    pub duration_ms: f64,
    pub span_count: u64,
    pub total_tokens: i64,
    pub cost_usd: f64,
    pub error: bool,
}

/// Trace totals of `b` minus those of `a`.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct TotalsDiff {
    pub duration_ms: f64,
    pub total_tokens: i64,
    pub cost_usd: f64,
    pub span_count: i64,
}

/// A span present in both traces, and how its two versions differ.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct AlignedSpan {
    pub path: String,
    pub a_span_id: String,
    pub b_span_id: String,
    pub name: String,
    /// The LLM kind in `a` (in `b` when `a` has none).
    pub llm_kind: String,
    /// Differing fields, in a fixed order (that of [`DiffField`]).
    pub differences: Vec<Difference>,
    /// True when nothing compared differs.
    pub same: bool,
}

/// A compared field of a span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, schemars::JsonSchema, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffField {
    /// The response model, or the request model when no response model is known.
    Model,
    PromptVersion,
    InputTokens,
    OutputTokens,
    TotalTokens,
    CostUsd,
    DurationMs,
    Status,
    Output,
}

/// One field that differs between the two versions of an aligned span.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct Difference {
    pub field: DiffField,
    /// The value in `a` (`null` when absent; output text cut to [`MAX_TEXT_CHARS`]).
    pub a: Value,
    /// The value in `b`, as for `a`.
    pub b: Value,
    /// `b - a`, for numbers present on both sides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// `(b - a) / |a|`, for numbers present on both sides with `a` not zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative: Option<f64>,
    /// Lengths and likeness of the two texts, for the `output` field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<TextDiff>,
}

/// Measures of two differing output texts.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq, Eq)]
pub struct TextDiff {
    /// Full length of the text in `a`, in characters (0 when absent).
    pub a_chars: usize,
    /// Full length of the text in `b`, in characters (0 when absent).
    pub b_chars: usize,
    /// True when the text reported for `a` is cut short.
    pub a_truncated: bool,
    /// True when the text reported for `b` is cut short.
    pub b_truncated: bool,
    /// How many leading characters the texts share (counted up to
    /// [`MAX_PREFIX_SCAN_CHARS`]); where a UI can start highlighting.
    pub common_prefix_chars: usize,
}

/// A span present in only one of the traces.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct SpanRef {
    pub path: String,
    pub span_id: String,
    pub name: String,
    pub llm_kind: String,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// Aligns the span trees of `a` and `b` and reports how they differ.
pub fn compare(a: &TraceView, b: &TraceView) -> Comparison {
    let mut aligned = Vec::new();
    let mut only_in_a = Vec::new();
    walk(a, b, |mine, theirs, path| match theirs {
        Some(other) => aligned.push(align(mine, other, path)),
        None => only_in_a.push(span_ref(mine, path)),
    });
    // Alignment is symmetric, so walking from `b` finds the same pairs and lists the
    // spans only `b` has in `b`'s own pre-order.
    let mut only_in_b = Vec::new();
    walk(b, a, |mine, theirs, path| {
        if theirs.is_none() {
            only_in_b.push(span_ref(mine, path));
        }
    });
    let (sa, sb) = (&a.summary, &b.summary);
    Comparison {
        a: TraceSide::of(a),
        b: TraceSide::of(b),
        totals_diff: TotalsDiff {
            duration_ms: sb.duration_ms - sa.duration_ms,
            total_tokens: sb.total_tokens.saturating_sub(sa.total_tokens),
            cost_usd: sb.cost_usd - sa.cost_usd,
            span_count: signed(sb.span_count).saturating_sub(signed(sa.span_count)),
        },
        aligned,
        only_in_a,
        only_in_b,
    }
}

impl TraceSide {
    fn of(t: &TraceView) -> TraceSide {
        let s = &t.summary;
        TraceSide {
            trace_id: t.trace_id.clone(),
            root_name: s.root_name.clone(),
            duration_ms: s.duration_ms,
            span_count: s.span_count,
            total_tokens: s.total_tokens,
            cost_usd: s.cost_usd,
            error: s.error,
        }
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A span of the walked tree, its counterpart in the other tree (if any) and its path.
struct Frame<'t> {
    mine: &'t SpanNode,
    theirs: Option<&'t SpanNode>,
    path: String,
}

/// Visits every span of `first` in pre-order with its counterpart in `second`.
fn walk<'t>(
    first: &'t TraceView,
    second: &'t TraceView,
    mut visit: impl FnMut(&'t SpanNode, Option<&'t SpanNode>, &str),
) {
    let mut stack = Vec::new();
    push_children(
        &mut stack,
        "",
        by_start(&first.roots),
        by_start(&second.roots),
    );
    while let Some(frame) = stack.pop() {
        visit(frame.mine, frame.theirs, frame.path.as_str());
        let theirs = frame
            .theirs
            .map(|t| t.children.as_slice())
            .unwrap_or_default();
        push_children(&mut stack, &frame.path, &frame.mine.children, theirs);
    }
}

/// Roots in start order; a trace built by `build_trace` has them so already, but the
/// alignment rule must not depend on who built the view.
fn by_start(roots: &[SpanNode]) -> Vec<&SpanNode> {
    let mut sorted: Vec<&SpanNode> = roots.iter().collect();
    sorted.sort_by(|x, y| (x.start_ns, &x.span_id).cmp(&(y.start_ns, &y.span_id)));
    sorted
}

/// Pairs the siblings `mine` with `theirs` by (name, occurrence index) and pushes them
/// so that the first of `mine` is popped first.
fn push_children<'t>(
    stack: &mut Vec<Frame<'t>>,
    parent_path: &str,
    mine: impl IntoIterator<Item = &'t SpanNode>,
    theirs: impl IntoIterator<Item = &'t SpanNode>,
) {
    let mut theirs_by_name: HashMap<&'t str, Vec<&'t SpanNode>> = HashMap::new();
    for node in theirs {
        theirs_by_name
            .entry(node.name.as_str())
            .or_default()
            .push(node);
    }
    let mut seen: HashMap<&'t str, usize> = HashMap::new();
    let first = stack.len();
    for node in mine {
        let count = seen.entry(node.name.as_str()).or_default();
        let index = *count;
        *count += 1;
        let counterpart = theirs_by_name
            .get(node.name.as_str())
            .and_then(|same_name| same_name.get(index))
            .copied();
        stack.push(Frame {
            mine: node,
            theirs: counterpart,
            path: child_path(parent_path, &node.name, index),
        });
    }
    stack[first..].reverse();
}

/// The path of a child: its parent's path plus `name#index`, bounded in length.
fn child_path(parent: &str, name: &str, index: usize) -> String {
    let mut path = String::with_capacity(parent.len() + name.len() + 8);
    if !parent.is_empty() {
        path.push_str(parent);
        path.push('/');
    }
    for c in name.chars() {
        match c {
            '%' => path.push_str("%25"),
            '/' => path.push_str("%2F"),
            '#' => path.push_str("%23"),
            c => path.push(c),
        }
    }
    path.push('#');
    path.push_str(&index.to_string());
    shorten_front(path)
}

/// Drops whole leading segments of a path longer than [`MAX_PATH_BYTES`], keeping at
/// least the last one. Parents are already bounded, so this costs O(bound) per span
/// rather than O(depth), which would make a deep chain quadratic.
fn shorten_front(path: String) -> String {
    if path.len() <= MAX_PATH_BYTES {
        return path;
    }
    let budget = MAX_PATH_BYTES.saturating_sub(ELIDED.len());
    // Names are encoded, so every '/' starts a segment; '/' is ASCII, so the byte
    // after it is a char boundary.
    let start = path
        .match_indices('/')
        .map(|(i, _)| i + 1)
        .find(|&s| path.len() - s <= budget)
        .or_else(|| path.rfind('/').map(|i| i + 1));
    match start {
        Some(s) => format!("{ELIDED}{}", &path[s..]),
        None => path,
    }
}

fn span_ref(node: &SpanNode, path: &str) -> SpanRef {
    SpanRef {
        path: path.to_owned(),
        span_id: node.span_id.clone(),
        name: node.name.clone(),
        llm_kind: node.llm_kind.clone(),
        duration_ms: node.duration_ms,
        cost_usd: node.cost_total_usd,
    }
}

fn align(a: &SpanNode, b: &SpanNode, path: &str) -> AlignedSpan {
    let differences = field_differences(a, b);
    let llm_kind = if a.llm_kind.is_empty() {
        &b.llm_kind
    } else {
        &a.llm_kind
    };
    AlignedSpan {
        path: path.to_owned(),
        a_span_id: a.span_id.clone(),
        b_span_id: b.span_id.clone(),
        name: a.name.clone(),
        llm_kind: llm_kind.clone(),
        same: differences.is_empty(),
        differences,
    }
}

/// The fields of two aligned spans that differ, in [`DiffField`] order.
fn field_differences(a: &SpanNode, b: &SpanNode) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut label = |field, x: Option<&str>, y: Option<&str>| {
        if x != y {
            out.push(plain(field, opt_text(x), opt_text(y)));
        }
    };
    label(DiffField::Model, model(a), model(b));
    label(
        DiffField::PromptVersion,
        a.prompt_version.as_deref(),
        b.prompt_version.as_deref(),
    );
    for (field, x, y) in [
        (DiffField::InputTokens, a.input_tokens, b.input_tokens),
        (DiffField::OutputTokens, a.output_tokens, b.output_tokens),
        (DiffField::TotalTokens, a.total_tokens, b.total_tokens),
    ] {
        if x != y {
            out.push(numeric(field, opt_int(x), opt_int(y)));
        }
    }
    if costs_differ(a.cost_total_usd, b.cost_total_usd) {
        out.push(numeric(
            DiffField::CostUsd,
            opt_float(a.cost_total_usd),
            opt_float(b.cost_total_usd),
        ));
    }
    // Every change of duration is reported, however small: the deltas let a UI rank
    // spans by where the time went.
    if a.duration_ms != b.duration_ms {
        out.push(numeric(
            DiffField::DurationMs,
            Value::from(a.duration_ms),
            Value::from(b.duration_ms),
        ));
    }
    if a.status != b.status {
        out.push(plain(
            DiffField::Status,
            Value::from(a.status.as_str()),
            Value::from(b.status.as_str()),
        ));
    }
    if a.output != b.output {
        out.push(output_difference(a.output.as_deref(), b.output.as_deref()));
    }
    out
}

fn model(s: &SpanNode) -> Option<&str> {
    s.response_model.as_deref().or(s.request_model.as_deref())
}

fn opt_text(v: Option<&str>) -> Value {
    v.map_or(Value::Null, Value::from)
}

fn opt_int(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::from)
}

fn opt_float(v: Option<f64>) -> Value {
    v.map_or(Value::Null, Value::from)
}

fn costs_differ(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() > COST_EPSILON_USD,
        (None, None) => false,
        _ => true,
    }
}

/// A difference of values that are not numbers.
fn plain(field: DiffField, a: Value, b: Value) -> Difference {
    Difference {
        field,
        a,
        b,
        delta: None,
        relative: None,
        text: None,
    }
}

/// A difference of numbers, with `b - a` and `(b - a) / |a|` where both are known.
fn numeric(field: DiffField, a: Value, b: Value) -> Difference {
    let (delta, relative) = match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => {
            let delta = Some(y - x).filter(|d| d.is_finite());
            let relative = delta
                .filter(|_| x != 0.0)
                .map(|d| d / x.abs())
                .filter(|r| r.is_finite());
            (delta, relative)
        }
        _ => (None, None),
    };
    Difference {
        field,
        a,
        b,
        delta,
        relative,
        text: None,
    }
}

fn output_difference(a: Option<&str>, b: Option<&str>) -> Difference {
    let (a_value, a_truncated, a_chars) = excerpt(a);
    let (b_value, b_truncated, b_chars) = excerpt(b);
    let common_prefix_chars = a
        .unwrap_or_default()
        .chars()
        .zip(b.unwrap_or_default().chars())
        .take(MAX_PREFIX_SCAN_CHARS)
        .take_while(|(x, y)| x == y)
        .count();
    Difference {
        field: DiffField::Output,
        a: a_value,
        b: b_value,
        delta: None,
        relative: None,
        text: Some(TextDiff {
            a_chars,
            b_chars,
            a_truncated,
            b_truncated,
            common_prefix_chars,
        }),
    }
}

/// The text as reported (at most [`MAX_TEXT_CHARS`] characters), whether it was cut
/// and its full length in characters.
fn excerpt(text: Option<&str>) -> (Value, bool, usize) {
    let Some(text) = text else {
        return (Value::Null, false, 0);
    };
    let (head, truncated) = truncate_chars(text, MAX_TEXT_CHARS);
    (Value::from(head), truncated, text.chars().count())
}

/// The first `max` characters of `s` (never splitting one) and whether any were left.
fn truncate_chars(s: &str, max: usize) -> (&str, bool) {
    match s.char_indices().nth(max) {
        Some((end, _)) => (&s[..end], true),
        None => (s, false),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::engine::build_trace;
    use crate::model::ms;

    const MS: i64 = 1_000_000;

    /// A span lasting `[start, end)` milliseconds, shaped like the engine tests' `node`.
    fn node(id: &str, parent: Option<&str>, name: &str, start: i64, end: i64) -> SpanNode {
        SpanNode {
            name: name.into(),
            ..SpanNode::test(id, parent, start * MS, end * MS)
        }
    }

    fn llm(id: &str, parent: &str, start: i64, end: i64, output: &str) -> SpanNode {
        SpanNode {
            llm_kind: "LLM".into(),
            provider: Some("openai".into()),
            request_model: Some("gpt-4o".into()),
            response_model: Some("gpt-4o".into()),
            prompt_name: Some("answer".into()),
            prompt_version: Some("v1".into()),
            input_tokens: Some(10),
            output_tokens: Some(5),
            total_tokens: Some(15),
            cost_total_usd: Some(0.5),
            output: Some(output.into()),
            ..node(id, Some(parent), "llm", start, end)
        }
    }

    fn tool(id: &str, parent: &str, name: &str, start: i64, end: i64) -> SpanNode {
        SpanNode {
            llm_kind: "TOOL".into(),
            ..node(id, Some(parent), name, start, end)
        }
    }

    /// agent ─ llm, tool.search, llm
    fn agent_spans() -> Vec<SpanNode> {
        vec![
            SpanNode {
                llm_kind: "AGENT".into(),
                ..node("r", None, "agent", 0, 100)
            },
            llm("l1", "r", 0, 10, "let me search"),
            tool("t1", "r", "tool.search", 10, 20),
            llm("l2", "r", 20, 30, "the answer is 42"),
        ]
    }

    fn edit<'s>(spans: &'s mut [SpanNode], id: &str) -> &'s mut SpanNode {
        spans
            .iter_mut()
            .find(|s| s.span_id == id)
            .expect("the span is in the list")
    }

    /// The same spans under other ids, as a second run of the app would have them.
    fn renamed(spans: Vec<SpanNode>, prefix: &str) -> Vec<SpanNode> {
        spans
            .into_iter()
            .map(|s| SpanNode {
                span_id: format!("{prefix}{}", s.span_id),
                parent_span_id: s.parent_span_id.map(|p| format!("{prefix}{p}")),
                ..s
            })
            .collect()
    }

    fn trace(id: &str, spans: Vec<SpanNode>) -> TraceView {
        build_trace(id.into(), spans)
    }

    fn paths(c: &Comparison) -> Vec<&str> {
        c.aligned.iter().map(|s| s.path.as_str()).collect()
    }

    fn ref_paths(refs: &[SpanRef]) -> Vec<&str> {
        refs.iter().map(|s| s.path.as_str()).collect()
    }

    fn aligned<'c>(c: &'c Comparison, path: &str) -> &'c AlignedSpan {
        c.aligned
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("{path} is aligned"))
    }

    fn close(x: f64, y: f64) -> bool {
        (x - y).abs() < 1e-9
    }

    #[test]
    fn a_trace_compared_with_itself_is_the_same_everywhere() {
        let t = trace("t1", agent_spans());
        let c = compare(&t, &t);
        assert_eq!(
            paths(&c),
            [
                "agent#0",
                "agent#0/llm#0",
                "agent#0/tool.search#0",
                "agent#0/llm#1"
            ]
        );
        for s in &c.aligned {
            assert!(s.same, "{} differs: {:?}", s.path, s.differences);
            assert!(s.differences.is_empty());
            assert_eq!(s.a_span_id, s.b_span_id);
        }
        assert!(c.only_in_a.is_empty());
        assert!(c.only_in_b.is_empty());
        assert_eq!(
            c.totals_diff,
            TotalsDiff {
                duration_ms: 0.0,
                total_tokens: 0,
                cost_usd: 0.0,
                span_count: 0
            }
        );
        assert_eq!(c.a, c.b);
        assert_eq!(c.a.root_name, "agent");
        assert_eq!(c.a.span_count, 4);
    }

    #[test]
    fn a_model_swap_and_a_new_prompt_version_are_reported() {
        let mut b = renamed(agent_spans(), "b-");
        let l1 = edit(&mut b, "b-l1");
        l1.request_model = Some("gpt-4o-mini".into());
        l1.response_model = Some("gpt-4o-mini-2024-07-18".into());
        l1.prompt_version = Some("v2".into());
        // Only the request model is known in b: the model is the same all the same.
        edit(&mut b, "b-l2").response_model = None;
        let c = compare(&trace("a", agent_spans()), &trace("b", b));

        let s = aligned(&c, "agent#0/llm#0");
        assert_eq!((s.a_span_id.as_str(), s.b_span_id.as_str()), ("l1", "b-l1"));
        assert_eq!(s.llm_kind, "LLM");
        assert!(!s.same);
        assert_eq!(
            s.differences,
            [
                Difference {
                    field: DiffField::Model,
                    a: json!("gpt-4o"),
                    b: json!("gpt-4o-mini-2024-07-18"),
                    delta: None,
                    relative: None,
                    text: None,
                },
                Difference {
                    field: DiffField::PromptVersion,
                    a: json!("v1"),
                    b: json!("v2"),
                    delta: None,
                    relative: None,
                    text: None,
                },
            ]
        );
        for path in ["agent#0", "agent#0/tool.search#0", "agent#0/llm#1"] {
            assert!(aligned(&c, path).same, "{path}");
        }
    }

    #[test]
    fn an_extra_tool_call_is_only_in_b_and_later_siblings_stay_aligned() {
        let mut b = renamed(agent_spans(), "b-");
        b.push(tool("b-t2", "b-r", "tool.fetch", 15, 18));
        b.push(node("b-h", Some("b-t2"), "http GET", 16, 17));
        let c = compare(&trace("a", agent_spans()), &trace("b", b));

        assert_eq!(
            ref_paths(&c.only_in_b),
            ["agent#0/tool.fetch#0", "agent#0/tool.fetch#0/http GET#0"]
        );
        assert_eq!(c.only_in_b[0].span_id, "b-t2");
        assert_eq!(c.only_in_b[0].llm_kind, "TOOL");
        assert_eq!(c.only_in_b[0].duration_ms, 3.0);
        assert!(c.only_in_a.is_empty());

        let last = aligned(&c, "agent#0/llm#1");
        assert_eq!(
            (last.a_span_id.as_str(), last.b_span_id.as_str()),
            ("l2", "b-l2")
        );
        assert!(last.same);
        assert!(c.aligned.iter().all(|s| s.same));
        assert_eq!(c.totals_diff.span_count, 2);
        assert_eq!(c.totals_diff.total_tokens, 0);
    }

    #[test]
    fn agent_loop_iterations_align_by_order_at_every_level() {
        fn looped(iterations: i64, prefix: &str) -> Vec<SpanNode> {
            let mut spans = vec![node("r", None, "agent", 0, 1000)];
            for i in 0..iterations {
                let it = format!("it{i}");
                spans.push(node(&it, Some("r"), "iteration", i * 100, i * 100 + 90));
                spans.push(llm(
                    &format!("l{i}"),
                    &it,
                    i * 100,
                    i * 100 + 50,
                    &format!("step {i}"),
                ));
            }
            renamed(spans, prefix)
        }
        let a = trace("a", looped(3, "a-"));
        let b = trace("b", looped(4, "b-"));
        let c = compare(&a, &b);

        assert_eq!(
            paths(&c),
            [
                "agent#0",
                "agent#0/iteration#0",
                "agent#0/iteration#0/llm#0",
                "agent#0/iteration#1",
                "agent#0/iteration#1/llm#0",
                "agent#0/iteration#2",
                "agent#0/iteration#2/llm#0",
            ]
        );
        let pairs: Vec<(&str, &str)> = c
            .aligned
            .iter()
            .map(|s| (s.a_span_id.as_str(), s.b_span_id.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("a-r", "b-r"),
                ("a-it0", "b-it0"),
                ("a-l0", "b-l0"),
                ("a-it1", "b-it1"),
                ("a-l1", "b-l1"),
                ("a-it2", "b-it2"),
                ("a-l2", "b-l2"),
            ]
        );
        assert!(c.aligned.iter().all(|s| s.same));
        assert_eq!(
            ref_paths(&c.only_in_b),
            ["agent#0/iteration#3", "agent#0/iteration#3/llm#0"]
        );
        assert!(c.only_in_a.is_empty());

        let reversed = compare(&b, &a);
        assert_eq!(ref_paths(&reversed.only_in_a), ref_paths(&c.only_in_b));
        assert!(reversed.only_in_b.is_empty());
    }

    #[test]
    fn a_span_turning_to_error_is_reported() {
        let mut b = agent_spans();
        let t1 = edit(&mut b, "t1");
        t1.status = "ERROR".into();
        t1.status_message = Some("timeout".into());
        let c = compare(&trace("a", agent_spans()), &trace("b", b));

        let s = aligned(&c, "agent#0/tool.search#0");
        assert_eq!(
            s.differences,
            [Difference {
                field: DiffField::Status,
                a: json!("OK"),
                b: json!("ERROR"),
                delta: None,
                relative: None,
                text: None,
            }]
        );
        assert!(!c.a.error);
        assert!(c.b.error);
    }

    #[test]
    fn long_multibyte_outputs_are_cut_at_a_char_boundary() {
        let long = "日本".repeat(MAX_TEXT_CHARS); // 2 × MAX chars, 3 bytes each
        let mut a = agent_spans();
        edit(&mut a, "l2").output = Some(long.clone());
        let mut b = agent_spans();
        edit(&mut b, "l2").output = Some("日本語です".into());
        let c = compare(&trace("a", a), &trace("b", b));

        let s = aligned(&c, "agent#0/llm#1");
        let [d] = s.differences.as_slice() else {
            panic!("one difference expected: {:?}", s.differences);
        };
        assert_eq!(d.field, DiffField::Output);
        let cut: String = long.chars().take(MAX_TEXT_CHARS).collect();
        assert_eq!(d.a, json!(cut));
        assert_eq!(d.b, json!("日本語です"));
        assert_eq!(
            d.text,
            Some(TextDiff {
                a_chars: 2 * MAX_TEXT_CHARS,
                b_chars: 5,
                a_truncated: true,
                b_truncated: false,
                common_prefix_chars: 2,
            })
        );
        assert_eq!((d.delta, d.relative), (None, None));
    }

    #[test]
    fn a_missing_output_is_null_and_shares_no_prefix() {
        let mut b = agent_spans();
        edit(&mut b, "l1").output = None;
        let c = compare(&trace("a", agent_spans()), &trace("b", b));
        let d = &aligned(&c, "agent#0/llm#0").differences[0];
        assert_eq!(
            (d.field, &d.a, &d.b),
            (DiffField::Output, &json!("let me search"), &Value::Null)
        );
        let text = d
            .text
            .as_ref()
            .expect("output differences carry text measures");
        assert_eq!(
            (text.a_chars, text.b_chars, text.common_prefix_chars),
            (13, 0, 0)
        );
    }

    #[test]
    fn numbers_carry_deltas_and_relative_deltas() {
        let mut b = agent_spans();
        let l1 = edit(&mut b, "l1");
        l1.input_tokens = Some(20);
        l1.total_tokens = Some(25);
        l1.cost_total_usd = Some(0.75);
        l1.end_ns = 25 * MS;
        l1.duration_ms = ms(25 * MS);
        edit(&mut b, "t1").input_tokens = Some(7);
        let l2 = edit(&mut b, "l2");
        l2.output_tokens = Some(0);
        let mut a = agent_spans();
        edit(&mut a, "t1").input_tokens = Some(0);
        edit(&mut a, "l2").cost_total_usd = None;
        let c = compare(&trace("a", a), &trace("b", b));

        let l1 = aligned(&c, "agent#0/llm#0");
        let fields: Vec<DiffField> = l1.differences.iter().map(|d| d.field).collect();
        assert_eq!(
            fields,
            [
                DiffField::InputTokens,
                DiffField::TotalTokens,
                DiffField::CostUsd,
                DiffField::DurationMs
            ]
        );
        let d = &l1.differences;
        assert_eq!((&d[0].a, &d[0].b), (&json!(10), &json!(20)));
        assert_eq!((d[0].delta, d[0].relative), (Some(10.0), Some(1.0)));
        assert_eq!(d[1].delta, Some(10.0));
        assert!(close(d[1].relative.expect("a is not zero"), 10.0 / 15.0));
        assert_eq!((d[2].delta, d[2].relative), (Some(0.25), Some(0.5)));
        assert_eq!((&d[3].a, &d[3].b), (&json!(10.0), &json!(25.0)));
        assert_eq!((d[3].delta, d[3].relative), (Some(15.0), Some(1.5)));

        // From zero: a delta but no relative delta.
        let t1 = &aligned(&c, "agent#0/tool.search#0").differences;
        assert_eq!(t1.len(), 1);
        assert_eq!(
            (t1[0].field, t1[0].delta, t1[0].relative),
            (DiffField::InputTokens, Some(7.0), None)
        );

        // Known on one side only: reported, without deltas.
        let l2 = &aligned(&c, "agent#0/llm#1").differences;
        let fields: Vec<DiffField> = l2.iter().map(|d| d.field).collect();
        assert_eq!(fields, [DiffField::OutputTokens, DiffField::CostUsd]);
        assert_eq!((l2[0].delta, l2[0].relative), (Some(-5.0), Some(-1.0)));
        assert_eq!((&l2[1].a, &l2[1].b), (&Value::Null, &json!(0.5)));
        assert_eq!((l2[1].delta, l2[1].relative), (None, None));

        assert_eq!(c.totals_diff.total_tokens, 10);
        assert!(close(c.totals_diff.cost_usd, 0.75));
        assert_eq!(c.totals_diff.duration_ms, 0.0);
    }

    #[test]
    fn several_roots_are_siblings_in_start_order() {
        let spans = |prefix: &str| {
            renamed(
                vec![
                    node("late", Some("missing"), "worker", 50, 60),
                    node("first", None, "agent", 0, 40),
                    node("second", Some("gone"), "agent", 20, 30),
                ],
                prefix,
            )
        };
        let c = compare(&trace("a", spans("a-")), &trace("b", spans("b-")));
        assert_eq!(paths(&c), ["agent#0", "agent#1", "worker#0"]);
        assert_eq!(c.aligned[1].b_span_id, "b-second");
        assert!(c.aligned.iter().all(|s| s.same));
    }

    #[test]
    fn paths_encode_separators_and_stay_bounded_in_deep_trees() {
        let mut spans = vec![node("s0", None, "a/b#c%", 0, 1000)];
        for i in 1..300 {
            let (id, parent) = (format!("s{i}"), format!("s{}", i - 1));
            spans.push(node(&id, Some(parent.as_str()), "step", i, 1000 - i));
        }
        let t = trace("deep", spans);
        let c = compare(&t, &t);

        assert_eq!(c.aligned.len(), 300);
        assert!(c.aligned.iter().all(|s| s.same));
        assert_eq!(c.aligned[0].path, "a%2Fb%23c%25#0");
        assert_eq!(c.aligned[1].path, "a%2Fb%23c%25#0/step#0");
        let deepest = &c.aligned[299];
        assert_eq!(deepest.a_span_id, "s299");
        assert!(
            deepest.path.len() <= MAX_PATH_BYTES,
            "{}",
            deepest.path.len()
        );
        assert!(deepest.path.starts_with("…/step#0/"));
        assert!(deepest.path.ends_with("/step#0"));
    }

    #[test]
    fn the_comparison_round_trips_through_json() {
        let mut b = agent_spans();
        edit(&mut b, "l1").prompt_version = Some("v2".into());
        edit(&mut b, "l2").output = Some("the answer is 43".into());
        b.push(tool("t2", "r", "tool.fetch", 15, 18));
        let c = compare(&trace("a", agent_spans()), &trace("b", b));

        let v = serde_json::to_value(&c).expect("serializes");
        assert_eq!(v["aligned"][1]["differences"][0]["field"], "prompt_version");
        assert_eq!(
            v["aligned"][3]["differences"][0]["text"]["common_prefix_chars"],
            15
        );
        assert_eq!(v["only_in_b"][0]["path"], "agent#0/tool.fetch#0");
        assert_eq!(v["totals_diff"]["span_count"], 1);
        let back: Comparison = serde_json::from_value(v).expect("deserializes");
        assert_eq!(back, c);
    }

    #[test]
    fn truncation_never_splits_a_char() {
        assert_eq!(truncate_chars("héllo", 2), ("hé", true));
        assert_eq!(truncate_chars("héllo", 5), ("héllo", false));
        assert_eq!(truncate_chars("", 0), ("", false));
        assert_eq!(truncate_chars("🦀🦀", 1), ("🦀", true));
    }
}
