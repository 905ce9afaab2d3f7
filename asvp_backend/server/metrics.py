"""Prometheus metrics of the API: requests, latencies, errors, and (read at scrape time) jobs and rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class Metrics:
    def __init__(
        self, jobs_by_state: Callable[[], dict[str, int]], rounds_by_project: Callable[[], dict[int, int]]
    ):
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
        self.registry.register(_ScrapeTimeCollector(jobs_by_state, rounds_by_project))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 500:
            self.errors.labels("http_5xx").inc()


class _ScrapeTimeCollector:
    """Reads the queue and the project state when Prometheus scrapes, so the numbers are never stale."""

    def __init__(
        self, jobs_by_state: Callable[[], dict[str, int]], rounds_by_project: Callable[[], dict[int, int]]
    ):
        self.jobs_by_state = jobs_by_state
        self.rounds_by_project = rounds_by_project

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("asvp_jobs", "Recent jobs by state", labels=["state"])
        rounds = GaugeMetricFamily("asvp_rounds", "Selection rounds completed", labels=["project"])
        started = time.monotonic()
        try:
            for state, count in sorted(self.jobs_by_state().items()):
                jobs.add_metric([state], count)
            for project, count in sorted(self.rounds_by_project().items()):
                rounds.add_metric([str(project)], count)
        except Exception as exc:  # a scrape must not fail because Redis hiccuped
            log.warning("metrics scrape incomplete: %s", exc)
        log.debug("metrics scrape took %.3fs", time.monotonic() - started)
        yield jobs
        yield rounds
