"""Settings from environment variables, validated once at start.

Names follow Label Studio and its ML backend SDK where they exist (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY,
MODEL_DIR, BASIC_AUTH_USER, BASIC_AUTH_PASS, LOG_LEVEL, PORT, LOCAL_FILES_DOCUMENT_ROOT) so that a Label Studio
user's .env works unchanged; the rest are ours. Every field is declared here, so reading an undeclared
option cannot happen (a pitfall of the reference code).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from asvp_backend.alignment.policy import TRAINING_METHODS
from asvp_backend.state import MAX_SCORES


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable and what is allowed."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _int_in(low: int, high: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(f"{name} must be {bound}, got {value}")
        return value

    return parse


def _retrain_every(name: str, raw: str) -> int | str:
    """`auto` or a number of labels (>= 1)."""
    if raw.strip().lower() == "auto":
        return "auto"
    try:
        return _int_in(1)(name, raw)
    except ConfigError:
        raise ConfigError(f"{name} must be auto or an integer >= 1, got {raw!r}") from None


def _float_in(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {raw!r}")
        return value

    return parse


def _http_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    parsed = urlparse(value)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise ConfigError(f"{name} must be an http(s) URL such as http://label-studio:8080, got {raw!r}")
    return value


def _redis_url(name: str, raw: str) -> str:
    value = raw.strip()
    if urlparse(value).scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(f"{name} must look like redis://host:6379/0, got {raw!r}")
    return value


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def _host_list(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated host names as the Host header carries them, without scheme or port: `api.example.com`,
    `.example.com` (the domain and every subdomain, as in Django's ALLOWED_HOSTS), an IP address, or `*`."""
    entries: list[str] = []
    for item in raw.split(","):
        entry = item.strip().lower()
        if not entry:
            continue
        try:
            ipaddress.ip_address(entry.strip("[]"))
            is_ip = True
        except ValueError:
            is_ip = False
        if entry != "*" and not is_ip and not _HOST_NAME.fullmatch(entry.removeprefix(".")):
            raise ConfigError(f"{name} takes host names without scheme or port, comma-separated, such as "
                              f"asvp.example.com,.example.org (or * for any host); got {item.strip()!r}")
        entries.append(entry.strip("[]") if is_ip else entry)
    return tuple(entries)


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _env(env_name: str, parse: Callable[[str, str], Any], secret: bool = False, aliases: tuple[str, ...] = (),
         **kw: Any) -> Any:
    return field(metadata={"env": env_name, "parse": parse, "secret": secret, "aliases": aliases}, **kw)


@dataclass(frozen=True)
class Settings:
    """All configuration of the API and the workers. Build it with `Settings.from_env()`."""

    # Label Studio connection (Label Studio's names)
    # LABEL_STUDIO_HOST / LABEL_STUDIO_ACCESS_TOKEN: the names label-studio-sdk's own examples use
    label_studio_url: str | None = _env("LABEL_STUDIO_URL", _http_url, aliases=("LABEL_STUDIO_HOST",), default=None)
    label_studio_api_key: str | None = _env(
        "LABEL_STUDIO_API_KEY", _text, secret=True, aliases=("LABEL_STUDIO_ACCESS_TOKEN",), default=None
    )
    local_files_document_root: Path | None = _env("LOCAL_FILES_DOCUMENT_ROOT", _path, default=None)
    # Server
    model_dir: Path = _env("MODEL_DIR", _path, default=Path("data/models"))
    host: str = _env("HOST", _text, default="0.0.0.0")
    port: int = _env("PORT", _int_in(1, 65535), default=9090)
    workers: int = _env("WORKERS", _int_in(1, 64), default=1)  # uvicorn worker processes, as Label Studio's examples
    log_level: str = _env("LOG_LEVEL", _choice("debug", "info", "warning", "error"), default="info")
    basic_auth_user: str | None = _env("BASIC_AUTH_USER", _text, default=None)
    basic_auth_pass: str | None = _env("BASIC_AUTH_PASS", _text, secret=True, default=None)
    webhook_secret: str | None = _env("WEBHOOK_SECRET", _text, secret=True, default=None)
    # Host names the API answers to besides localhost, IP addresses, single-label names (compose services), names
    # under .local, .internal, .localhost, .home.arpa and this machine's name: the DNS-rebinding guard
    # (server/guards.py); "*" allows any
    allowed_hosts: tuple[str, ...] = _env("ALLOWED_HOSTS", _host_list, default=())
    max_body_bytes: int = _env("MAX_BODY_BYTES", _int_in(1024), default=64 * 2**20)
    # Queue: rq on Redis when set, otherwise an in-process worker (the embedded default)
    redis_url: str | None = _env("REDIS_URL", _redis_url, default=None)
    job_timeout: int = _env("JOB_TIMEOUT", _int_in(10), default=6 * 3600)
    # a running job's lease lapses this long after its worker stops renewing it (died, paused, starved)
    lease_seconds: float = _env("LEASE_SECONDS", _float_in(1.0, 3600.0), default=30.0)
    # Features
    backbone: str = _env("BACKBONE", _text, default="tf_efficientnet_lite0")
    backbone_weights: str = _env("BACKBONE_WEIGHTS", _text, default="auto")
    image_size: int | None = _env("IMAGE_SIZE", _int_in(16, 1024), default=None)
    device: str = _env("DEVICE", _choice("auto", "cpu", "cuda"), default="auto")
    extract_batch_size: int = _env("EXTRACT_BATCH_SIZE", _int_in(1, 4096), default=64)
    extract_workers: int | None = _env("EXTRACT_WORKERS", _int_in(0, 64), default=None)  # None: by device
    allow_private_image_hosts: bool = _env("ALLOW_PRIVATE_IMAGE_HOSTS", _bool, default=False)
    extract_slice_seconds: int = _env("EXTRACT_SLICE_SECONDS", _int_in(10), default=600)
    # a large extraction is split into this many gpu-queue jobs (jobs/extraction.py): the number of gpu workers
    extract_parts: int = _env("EXTRACT_PARTS", _int_in(1, 64), default=1)
    fetch_concurrency: int = _env("FETCH_CONCURRENCY", _int_in(1, 64), default=8)
    image_timeout: float = _env("IMAGE_TIMEOUT", _float_in(1.0, 600.0), default=30.0)
    # MiB of image decoding at once per process, across fetch threads (imaging.py::DecodeBudget)
    decode_budget_mb: int = _env("DECODE_BUDGET_MB", _int_in(16, 1_048_576), default=1024)
    # Selection
    strategy: str = _env("STRATEGY", _text, default="margin")
    cold_start_strategy: str = _env("COLD_START_STRATEGY", _text, default="typiclust")
    proxy: str = _env("PROXY", _text, default="mlp")
    epsilon: float = _env("EPSILON", _float_in(0.0, 1.0), default=0.0)
    # labels between rounds: a number, or "auto" (jobs/rounds.py::labels_between_rounds: every label on small
    # projects, up to every 10 on large ones); read it through `retrain_every` or the round's own rule
    retrain_cadence: int | str = _env("RETRAIN_EVERY", _retrain_every, default="auto")
    batch_size: int | None = _env("BATCH_SIZE", _int_in(1), default=None)  # None: RETRAIN_EVERY
    push_top_k: int = _env("PUSH_TOP_K", _int_in(1), default=2000)
    # seconds after which a sync reads every task again (catches lost webhooks); 0: only when one is needed
    reconcile_every: int = _env("RECONCILE_EVERY", _int_in(0), default=3600)
    # seconds a reconcile reads before it yields to the project's targeted reads and other projects (0: one page)
    reconcile_slice_seconds: int = _env("RECONCILE_SLICE_SECONDS", _int_in(0), default=20)
    ls_sampling: str = _env("LS_SAMPLING", _choice("uncertainty", "keep"), default="uncertainty")
    seed: int = _env("SEED", _int_in(0), default=0)
    # Alignment (ASVP): the LogME-PED trigger and the training method, see alignment/policy.py
    align: bool = _env("ALIGN", _bool, default=True)
    align_threshold: float = _env("ALIGN_THRESHOLD", _float_in(-1e6, 1e6), default=0.0)  # per 100 labels
    align_window: int = _env("ALIGN_WINDOW", _int_in(1, MAX_SCORES - 1), default=200)  # labels the trend spans
    align_min_labels: int = _env("ALIGN_MIN_LABELS", _int_in(2), default=500)
    align_min_new_labels: int = _env("ALIGN_MIN_NEW_LABELS", _int_in(0), default=250)
    align_max_updates: int = _env("ALIGN_MAX_UPDATES", _int_in(0), default=3)
    # The audit sample and the refresh gate (selection/audit.py, alignment/gate.py): the share of labels drawn at
    # random to judge models (a higher share until the audit has AUDIT_MIN_LABELS), and how sure the gate must be
    audit_fraction: float = _env("AUDIT_FRACTION", _float_in(0.0, 0.5), default=0.05)
    audit_early_fraction: float = _env("AUDIT_EARLY_FRACTION", _float_in(0.0, 0.5), default=0.2)
    audit_min_labels: int = _env("AUDIT_MIN_LABELS", _int_in(1), default=60)
    # "random": the labels present at the first round were drawn at random (say so only when they were) and
    # start the audit sample; "ignore": how they were chosen is unknown, and they never judge a model
    audit_existing: str = _env("AUDIT_EXISTING", _choice("ignore", "random"), default="ignore")
    align_gate: bool = _env("ALIGN_GATE", _bool, default=True)  # false: a refresh serves unjudged (comparisons)
    gate_z: float = _env("GATE_Z", _float_in(0.0, 10.0), default=1.0)
    training_method: str = _env("TRAINING_METHOD", _choice(*TRAINING_METHODS), default="auto")
    finetune_epochs: int | None = _env("FINETUNE_EPOCHS", _int_in(1, 1000), default=None)  # None: scaled
    finetune_batch_size: int | None = _env("FINETUNE_BATCH_SIZE", _int_in(2, 4096), default=None)  # None: scaled
    # FINETUNE_EPOCHS is raised to reach 150 optimiser steps (alignment/finetune.py MIN_STEPS); true: exactly
    finetune_exact_epochs: bool = _env("FINETUNE_EXACT_EPOCHS", _bool, default=False)
    # Stopping signal: advice that labelling can stop once predictions on a fixed stop set are stable
    stop_kappa: float = _env("STOP_KAPPA", _float_in(0.0, 1.0), default=0.99)
    stop_rounds: int = _env("STOP_ROUNDS", _int_in(1, 100), default=3)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every declared variable; raise ConfigError naming the first bad one."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            for name in (f.metadata["env"], *f.metadata["aliases"]):  # Label Studio's name wins over an alias
                raw = environ.get(name)
                if raw is not None and raw.strip() != "":
                    values[f.name] = f.metadata["parse"](name, raw)
                    break
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        from asvp_backend.selection.names import cold_start_strategy_names, proxy_names, strategy_names

        for env_name, value, known in (
            ("STRATEGY", self.strategy, strategy_names()),
            ("COLD_START_STRATEGY", self.cold_start_strategy, cold_start_strategy_names()),
            ("PROXY", self.proxy, proxy_names()),
        ):
            if value not in known:
                raise ConfigError(f"{env_name} must be one of {', '.join(known)}; got {value!r}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if self.label_studio_api_key and not self.label_studio_url:  # a token never goes to /setup's hostname
            raise ConfigError("LABEL_STUDIO_URL is required when LABEL_STUDIO_API_KEY is set")

    @property
    def retrain_every(self) -> int:
        """The fewest labels between two rounds: RETRAIN_EVERY, or 1 under `auto`, whose number depends on
        the project's size; a sync then queues a round at every label and the round job applies the rule."""
        return self.retrain_cadence if isinstance(self.retrain_cadence, int) else 1

    @property
    def selection_batch(self) -> int:
        """What set-based strategies pick per round: the batch labelled before the next one (a round under
        RETRAIN_EVERY=auto passes its own)."""
        return self.batch_size if self.batch_size is not None else self.retrain_every

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: state on disk and an in-process worker."""
        return self.redis_url is None

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, with every secret replaced, for logs and the status command."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = "***"
            elif f.name == "redis_url" and value:
                parsed = urlparse(value)
                if parsed.password:
                    value = value.replace(parsed.password, "***")
            out[f.metadata["env"]] = str(value) if isinstance(value, Path) else value
        return out


def env_names() -> list[str]:
    """Every environment variable the settings read, in declaration order (for .env.example and docs)."""
    return [f.metadata["env"] for f in fields(Settings)]
