"""Prometheus metrics of the API: requests, latencies, errors, webhooks, and the job queue's own counters.

A scrape reads only cumulative counters (one Redis hash, or a dict in-process) and the queue lengths, never
the job records or the projects' states, so it costs the same with 10 jobs or 10 million.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, job_counters: Callable[[], dict[str, int]], queue_lengths: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asvp_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "asvp_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
            registry=self.registry,
        )
        self.errors = Counter("asvp_errors_total", "Errors by kind", ["kind"], registry=self.registry)
        self.webhooks = Counter(
            "asvp_webhooks_total",
            "Webhook events by action and outcome",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_QueueCollector(job_counters, queue_lengths))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 500:
            self.errors.labels("http_5xx").inc()


class _QueueCollector:
    """Job events by kind (submitted, deduplicated, deferred, finished, failed, died) and queue lengths."""

    def __init__(self, job_counters: Callable[[], dict[str, int]], queue_lengths: Callable[[], dict[str, int]]):
        self.job_counters = job_counters
        self.queue_lengths = queue_lengths

    def collect(self) -> Iterator[Any]:
        jobs = CounterMetricFamily("asvp_jobs", "Job events by kind", labels=["event", "kind"])
        decisions = CounterMetricFamily("asvp_alignment_decisions", "Feature-alignment decisions after rounds "
                                        "(update, wait, off) and failed updates", labels=["decision"])
        waiting = GaugeMetricFamily("asvp_queue_length", "Jobs waiting in each queue", labels=["queue"])
        try:
            for key, count in sorted(self.job_counters().items()):
                event, _, kind = key.partition(":")
                if kind == "alignment":
                    decisions.add_metric([event.removeprefix("decision_")], count)
                else:
                    jobs.add_metric([event, kind], count)
            for name, length in sorted(self.queue_lengths().items()):
                waiting.add_metric([name], length)
        except Exception as exc:  # a scrape must not fail because Redis hiccuped
            log.warning("metrics scrape incomplete: %s", exc)
        yield jobs
        yield decisions
        yield waiting
