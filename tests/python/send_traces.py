#!/usr/bin/env python3
"""Send N small traces with the real OpenTelemetry Python SDK and report their ids.

Used by the agent tests: the SDK exports to `loupe agent` on loopback, as an
instrumented application in an injected pod does.

Usage:
    python send_traces.py --protocol grpc|http --endpoint http://127.0.0.1:PORT \
        --count N --service NAME

Prints one JSON line: {"trace_ids": ["<32 hex>", ...], "failed_exports": K}; exits 1
when an export failed (the agent answers at once, whatever its upstream does).
"""

from __future__ import annotations

import argparse
import json
import sys

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--service", default="agent-test")
    args = parser.parse_args()

    endpoint = args.endpoint.rstrip("/")
    if args.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        inner = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        inner = OTLPSpanExporter(endpoint=endpoint + "/v1/traces", timeout=10)

    failed = 0

    class Counting:
        def export(self, spans):
            nonlocal failed
            result = inner.export(spans)
            if result != SpanExportResult.SUCCESS:
                failed += 1
            return result

        def shutdown(self):
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    provider = TracerProvider(resource=Resource.create({"service.name": args.service}))
    provider.add_span_processor(BatchSpanProcessor(Counting(), max_export_batch_size=256))
    tracer = provider.get_tracer("loupe.tests.send_traces")
    ids = []
    for i in range(args.count):
        with tracer.start_as_current_span("request", attributes={"openinference.span.kind": "CHAIN"}) as root:
            ids.append(format(root.get_span_context().trace_id, "032x"))
            with tracer.start_as_current_span(
                "llm.chat",
                attributes={
                    "openinference.span.kind": "LLM",
                    "llm.model_name": "gpt-4o-mini",
                    "llm.token_count.prompt": 100 + i,
                    "llm.token_count.completion": 20,
                },
            ):
                pass
    provider.force_flush()
    provider.shutdown()
    print(json.dumps({"trace_ids": ids, "failed_exports": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
