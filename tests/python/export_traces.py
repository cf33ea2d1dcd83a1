#!/usr/bin/env python3
"""Export one RAG-like trace to Loupe with the real OpenTelemetry Python SDK.

Used by the integration tests to check that Loupe accepts what the official SDK
exporters send, over OTLP/gRPC and OTLP/HTTP (protobuf, gzip).

Usage:
    python export_traces.py --protocol grpc|http --endpoint http://127.0.0.1:PORT \
        [--header k=v ...] [--path /v1/traces] [--timeout SECONDS] --service NAME

On success prints one JSON line on stdout:
    {"trace_id": "<32 hex>", "span_ids": {"rag.query": "<16 hex>", ...}}
and exits 0. If the exporter reports a failure (or raises), prints the reason on
stderr and exits 1. Needs only opentelemetry-sdk and the OTLP exporter of the
chosen protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode


class CapturingExporter(SpanExporter):
    """Delegates to a real exporter and records what each export returned."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.results: list[SpanExportResult] = []
        self.errors: list[str] = []
        self.exported_spans = 0

    def export(self, spans):
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # the SDK would only log it; we want to fail
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.results.append(SpanExportResult.FAILURE)
            return SpanExportResult.FAILURE
        with self._lock:
            self.results.append(result)
            if result == SpanExportResult.SUCCESS:
                self.exported_spans += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flush = getattr(self._inner, "force_flush", None)
        return flush(timeout_millis) if flush else True


def parse_headers(items: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--header expects k=v, got {item!r}")
        # gRPC metadata keys must be lowercase; HTTP header names are case-insensitive.
        headers[key.strip().lower()] = value.strip()
    return headers


def make_exporter(args: argparse.Namespace) -> SpanExporter:
    headers = parse_headers(args.header)
    endpoint = args.endpoint.rstrip("/")
    if args.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        return OTLPSpanExporter(
            endpoint=endpoint,
            insecure=not endpoint.startswith("https://"),
            headers=headers or None,
            timeout=args.timeout,
        )

    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter,
    )

    path = args.path if args.path.startswith("/") else "/" + args.path
    return OTLPSpanExporter(
        endpoint=endpoint + path,
        headers=headers or None,
        timeout=args.timeout,
        compression=Compression.Gzip,
    )


def emit_trace(provider: TracerProvider) -> tuple[str, dict[str, str]]:
    tracer = provider.get_tracer("loupe.tests.export_traces", "0.1.0")
    span_ids: dict[str, str] = {}
    question = "How do I rotate an API key without downtime?"
    answer = (
        "Create the new key first, deploy it, then revoke the old one: both keys "
        "stay valid in parallel for up to 24 hours."
    )

    with tracer.start_as_current_span(
        "rag.query",
        kind=SpanKind.SERVER,
        attributes={
            "openinference.span.kind": "CHAIN",
            "user.id": "u-py",
            "session.id": "s-py",
            "input.value": question,
            "input.mime_type": "text/plain",
        },
    ) as root:
        ctx = root.get_span_context()
        trace_id = format(ctx.trace_id, "032x")
        span_ids["rag.query"] = format(ctx.span_id, "016x")

        with tracer.start_as_current_span(
            "embed",
            kind=SpanKind.CLIENT,
            attributes={
                "openinference.span.kind": "EMBEDDING",
                "embedding.model_name": "text-embedding-3-small",
                "embedding.embeddings.0.embedding.text": question,
                "llm.token_count.prompt": 12,
                "llm.token_count.total": 12,
            },
        ) as span:
            span_ids["embed"] = format(span.get_span_context().span_id, "016x")

        with tracer.start_as_current_span(
            "retrieve",
            kind=SpanKind.INTERNAL,
            attributes={
                "openinference.span.kind": "RETRIEVER",
                "input.value": question,
                "retrieval.documents.0.document.id": "kb-api-keys",
                "retrieval.documents.0.document.content": (
                    "Create the new key under Settings > API keys before revoking "
                    "the old one. Both keys work in parallel for up to 24 hours."
                ),
                "retrieval.documents.0.document.score": 0.91,
                "retrieval.documents.0.document.metadata": json.dumps(
                    {"title": "Rotating API keys"}
                ),
                "retrieval.documents.1.document.id": "kb-audit",
                "retrieval.documents.1.document.content": (
                    "The audit log records key creation and revocation."
                ),
                "retrieval.documents.1.document.score": 0.74,
                "retrieval.documents.1.document.metadata": json.dumps(
                    {"title": "Audit log"}
                ),
            },
        ) as span:
            span_ids["retrieve"] = format(span.get_span_context().span_id, "016x")

        with tracer.start_as_current_span(
            "llm.chat",
            kind=SpanKind.CLIENT,
            attributes={
                "openinference.span.kind": "LLM",
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                "gen_ai.usage.input_tokens": 1200,
                "gen_ai.usage.output_tokens": 300,
                "gen_ai.response.finish_reasons": ["stop"],
                "gen_ai.input.messages": json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": question}]}]
                ),
                "gen_ai.output.messages": json.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [{"type": "text", "content": answer}],
                            "finish_reason": "stop",
                        }
                    ]
                ),
            },
        ) as span:
            span_ids["llm.chat"] = format(span.get_span_context().span_id, "016x")
            span.set_status(Status(StatusCode.OK))

        root.set_attribute("output.value", answer)
        root.set_status(Status(StatusCode.OK))

    return trace_id, span_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--endpoint", required=True, help="e.g. http://127.0.0.1:4317")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="K=V",
        help="extra request header / gRPC metadata (repeatable)",
    )
    parser.add_argument(
        "--path", default="/v1/traces", help="URL path for http (default /v1/traces)"
    )
    parser.add_argument("--service", required=True, help="service.name of the resource")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="exporter timeout in seconds, retries included (default 10)",
    )
    args = parser.parse_args(argv)

    exporter = CapturingExporter(make_exporter(args))
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": args.service,
                "service.version": "0.1.0",
                "deployment.environment.name": "dev",
            }
        )
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))

    trace_id, span_ids = emit_trace(provider)
    flushed = provider.force_flush(int((args.timeout + 5) * 1000))
    provider.shutdown()

    failures = [r for r in exporter.results if r != SpanExportResult.SUCCESS]
    if exporter.errors:
        print("export raised: " + "; ".join(exporter.errors), file=sys.stderr)
    if not exporter.results:
        print("export failed: the exporter was never called", file=sys.stderr)
        return 1
    if failures:
        print(
            f"export failed: {len(failures)} of {len(exporter.results)} export call(s) "
            f"returned {failures[0].name} ({args.protocol} {args.endpoint})",
            file=sys.stderr,
        )
        return 1
    if not flushed or exporter.exported_spans != len(span_ids):
        print(
            f"export incomplete: {exporter.exported_spans} of {len(span_ids)} spans "
            f"exported (flushed={flushed})",
            file=sys.stderr,
        )
        return 1

    print(json.dumps({"trace_id": trace_id, "span_ids": span_ids}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
