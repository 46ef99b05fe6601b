"""Load generator: send one OTLP/gRPC payload over and over from `concurrency` threads; print JSON stats.

    python bench/otlp_load.py HOST:PORT PAYLOAD_FILE SECONDS CONCURRENCY
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def main() -> None:
    endpoint, payload_file, seconds, concurrency = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    with open(payload_file, "rb") as f:
        payload = f.read()
    spans_per_request = sum(len(ss.spans) for rs in ExportTraceServiceRequest.FromString(payload).resource_spans
                            for ss in rs.scope_spans)
    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_unary(EXPORT, request_serializer=None,
                               response_deserializer=ExportTraceServiceResponse.FromString)
    for _ in range(5):
        call(payload, timeout=30)  # warm-up
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < stop_at:
            try:
                call(payload, timeout=30)
                ok = True
            except grpc.RpcError:
                ok = False
            with lock:
                counts["requests" if ok else "errors"] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    print(json.dumps({**counts, "spans": counts["requests"] * spans_per_request, "seconds": elapsed}))


if __name__ == "__main__":
    main()
