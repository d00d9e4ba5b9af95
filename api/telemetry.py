"""The API's metrics: requests per route and status, refusals per reason code (the
consent policy's refusals are counted on `ingest.audience.REFUSALS`, door `http`)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Histogram

REQUESTS: Final = Counter(
    "meterproof_api_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY: Final = Histogram(
    "meterproof_api_request_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
REFUSALS: Final = Counter(
    "meterproof_api_refusals_total", "Requests refused, by stable reason code", ["code"]
)
