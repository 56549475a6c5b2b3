"""Server metrics in the Prometheus text format (exposition format 0.0.4), without a client library:
request counters by endpoint and status, queue and batch gauges, token counters, cache blocks, MTP
acceptance, and histograms of time to first token and end-to-end latency."""

from __future__ import annotations

from dataclasses import dataclass, field


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, help: str) -> list[str]:
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}",
                      f"{name}_count {self.count}"]


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
              "/metrics")


@dataclass
class ServerMetrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(_LATENCY_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(_LATENCY_BUCKETS))
    rejected_full: int = 0
    client_disconnects: int = 0

    def count(self, path: str, status: int) -> None:
        ep = path if path in _ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        self.requests[(ep, status)] = self.requests.get((ep, status), 0) + 1


def prometheus_text(s: dict, m: ServerMetrics, outstanding: int) -> str:
    """The Prometheus text exposition of the engine snapshot `s` and the server counters `m`."""
    rate = s["accepted"] / s["drafted"] if s["drafted"] else float("nan")
    lines = ["# HELP dsv3_requests_total HTTP requests by endpoint and status code.",
             "# TYPE dsv3_requests_total counter"]
    lines += [f'dsv3_requests_total{{endpoint="{ep}",status="{st}"}} {v}' for (ep, st), v in sorted(m.requests.items())]

    def one(name, kind, help, value):
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])

    one("dsv3_requests_running", "gauge", "Engine requests in the running batch.", s["running"])
    one("dsv3_requests_waiting", "gauge", "Engine requests queued for admission.", s["waiting"])
    one("dsv3_requests_outstanding", "gauge", "Engine requests submitted and not yet finished or aborted.",
        outstanding)
    one("dsv3_requests_aborted_total", "counter", "Engine requests aborted (client disconnects).", s["aborted"])
    one("dsv3_client_disconnects_total", "counter", "HTTP requests whose client left before the end.",
        m.client_disconnects)
    one("dsv3_requests_rejected_queue_full_total", "counter", "Requests answered 503 because the queue was full.",
        m.rejected_full)
    one("dsv3_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prefill_tokens"])
    one("dsv3_generation_tokens_total", "counter", "Tokens generated.", s["generated_tokens"])
    one("dsv3_engine_steps_total", "counter", "Engine steps.", s["steps"])
    one("dsv3_cache_blocks_used", "gauge", "KV-cache blocks reserved by requests.",
        s["blocks_total"] - s["blocks_free"])
    one("dsv3_cache_blocks_free", "gauge", "KV-cache blocks free.", s["blocks_free"])
    one("dsv3_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", s["blocks_total"])
    one("dsv3_spec_decode_draft_tokens_total", "counter", "MTP draft tokens verified.", s["drafted"])
    one("dsv3_spec_decode_accepted_tokens_total", "counter", "MTP draft tokens accepted.", s["accepted"])
    one("dsv3_spec_decode_acceptance_rate", "gauge", "Accepted / drafted MTP tokens (NaN before any draft).", rate)
    lines += m.ttft.lines("dsv3_time_to_first_token_seconds", "Time from request arrival to its first token.")
    lines += m.latency.lines("dsv3_e2e_request_latency_seconds", "Time from request arrival to its last token.")
    return "\n".join(lines) + "\n"
