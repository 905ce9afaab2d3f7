"""Forged requests, refused before the body is read (issue 17, item 2). LimitsAndAuth (middleware.py) applies three
rules to every request:

1. **Host** (DNS rebinding). A page on `evil.example.com` whose name is then re-pointed at the backend's
   address is, to the browser, the same origin as the backend: it can read every answer and send JSON. The
   Host header then still says `evil.example.com`, so a request must name a host the backend answers to:
   `localhost`, any IP address (an IP literal cannot be rebound), a single-label name (a compose service
   such as `api`), a name under a domain that public DNS cannot hold (`.localhost`, `.local`, `.home.arpa`,
   `.internal`: `host.docker.internal`), this machine's own name, and what ALLOWED_HOSTS lists (`*`: any).
   400 otherwise. `/health` and `/` answer any Host: they change nothing, show nothing secret, and probes
   (Docker, Kubernetes, load balancers, uptime monitors) often send a Host nobody thought to list.
2. **Cross-site** (CSRF). A request that may change something (every method but GET, HEAD and OPTIONS, on
   every path, so a route added later is covered without a list to update) is refused with 403 when the
   browser marks it `Sec-Fetch-Site: cross-site` or `same-site` (another port of the same host is the same
   site: Label Studio's pages must not post here either), or when its Origin is neither the backend itself
   nor a host ALLOWED_HOSTS names (not `*`: a reverse proxy that rewrites Host needs its public name
   listed). Label Studio's server sends neither header; the status page's own fetch() sends
   `Sec-Fetch-Site: same-origin` and its own origin.
3. **Content-Type**. Such requests must be `application/json` (parameters such as `; charset=utf-8` are
   fine), 415 otherwise: a form or `fetch(..., {mode: "no-cors"})` from another site can only send
   `application/x-www-form-urlencoded`, `multipart/form-data` or `text/plain`, and JSON needs a CORS
   preflight the backend never grants. This alone stops forms in browsers that send no Sec-Fetch-* headers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_HOST_ROUTES = frozenset({"/", "/health"})
FOREIGN_SITES = frozenset({"cross-site", "same-site"})
JSON_MEDIA_TYPE = "application/json"
DEFAULT_PORTS = {"http": "80", "https": "443"}
MAX_WARNINGS = 100  # distinct refusals logged per process: a hostile page must not flood the log
# names no one can register in public DNS, so no attacker's page can be served under them: RFC 6761
# (.localhost: browsers resolve it to loopback themselves), RFC 6762 (.local, mDNS), RFC 8375 (.home.arpa), and
# .internal (reserved by ICANN for private use in 2024; Docker's host.docker.internal)
PRIVATE_DOMAINS = (".localhost", ".local", ".home.arpa", ".internal")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")  # one DNS label (compose names may hold `_`)


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str


def split_host(value: str) -> tuple[str, str]:
    """A Host header or an origin's netloc as (host name in lower case, IPv6 without brackets; port or '')."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, ""
        rest = value[end + 1:]
        return value[1:end], rest[1:] if rest.startswith(":") else ""
    host, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return host, port
    return value, ""


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostRule:
    """Which Host names the backend answers to (module docstring, rule 1)."""

    def __init__(self, listed: Iterable[str], own_names: Iterable[str] = ()) -> None:
        entries = {entry.lower() for entry in listed}
        self.any = "*" in entries
        self.exact = {e for e in entries if e != "*" and not e.startswith(".")}
        self.domains = tuple(e for e in entries if e.startswith("."))
        self.own = {name.lower() for name in own_names if name}

    def listed(self, host: str) -> bool:
        """Named in ALLOWED_HOSTS itself (`*` aside): `.example.com` names the domain and its subdomains."""
        return host in self.exact or any(host == d[1:] or host.endswith(d) for d in self.domains)

    def allows(self, host: str) -> bool:
        if self.any or self.listed(host) or host in self.own:
            return True
        if host == "localhost" or host.endswith(PRIVATE_DOMAINS):
            return True
        return is_ip_address(host) or bool(_LABEL.fullmatch(host))


class RequestGuard:
    """The three rules; each check returns None or the refusal to send."""

    def __init__(self, allowed_hosts: Iterable[str], own_names: Iterable[str] | None = None) -> None:
        self.hosts = HostRule(allowed_hosts, own_names if own_names is not None else (socket.gethostname(),))
        self._warned: set[tuple[str, str]] = set()

    def check_host(self, path: str, headers: Mapping[str, str]) -> Refusal | None:
        value = headers.get("host")
        if path in ANY_HOST_ROUTES or self.hosts.any or value is None:  # no browser leaves out Host
            return None
        host, _ = split_host(value)
        if self.hosts.allows(host):
            return None
        self._warn("host", host, f"refused a request for Host {host[:100]!r}: not in ALLOWED_HOSTS. If Label "
                                 "Studio, a proxy or your browser reaches the backend by this name, add it there")
        return Refusal(400, f"Host {host[:100]!r} is not allowed: the backend answers to localhost, IP addresses, "
                            "single-label names and the names in ALLOWED_HOSTS (add this one there if it is "
                            "how you reach the backend)")

    def check_cross_site(self, method: str, headers: Mapping[str, str]) -> Refusal | None:
        if method in SAFE_METHODS:
            return None
        site = headers.get("sec-fetch-site", "").strip().lower()
        if site in FOREIGN_SITES:
            self._warn("site", site, f"refused a {site} {method} (Sec-Fetch-Site: {site}): a page on another "
                                     "site tried to make a browser change the backend")
            return Refusal(403, f"{site} request refused (Sec-Fetch-Site: {site}): changes come only from Label "
                                "Studio, scripts and the backend's own status page")
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, headers.get("host")):
            self._warn("origin", origin[:100], f"refused a {method} from Origin {origin[:100]!r}: neither this "
                                               "backend nor a host in ALLOWED_HOSTS")
            return Refusal(403, f"request from another origin refused (Origin: {origin[:100]!r}): changes come "
                                "only from Label Studio, scripts and the backend's own status page; behind a "
                                "proxy that rewrites Host, list the public name in ALLOWED_HOSTS")
        return None

    def check_content_type(self, method: str, path: str, headers: Mapping[str, str]) -> Refusal | None:
        if method in SAFE_METHODS:
            return None
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == JSON_MEDIA_TYPE:
            return None
        got = f"Content-Type {media_type[:100]!r}" if media_type else "no Content-Type"
        return Refusal(415, f"{method} {path[:100]} takes Content-Type: application/json only, got {got} (a "
                            "form on another site cannot send JSON; with curl: -H 'Content-Type: "
                            "application/json' -d '{}')")

    def _origin_ok(self, origin: str, host_header: str | None) -> bool:
        """The request comes from the backend's own pages (same host and port as the Host header), or from a
        host ALLOWED_HOSTS names. `null` (sandboxed frames, file: pages) and anything unparsable are not."""
        try:
            parts = urlsplit(origin.strip())
            host, port = split_host(parts.netloc)
        except ValueError:
            return False
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not host:
            return False
        if host_header is not None:
            own_host, own_port = split_host(host_header)
            if (host, port or DEFAULT_PORTS[scheme]) == (own_host, own_port or DEFAULT_PORTS[scheme]):
                return True
        return self.hosts.listed(host)

    def _warn(self, kind: str, key: str, message: str) -> None:
        if (kind, key) in self._warned or len(self._warned) >= MAX_WARNINGS:
            return
        self._warned.add((kind, key))
        log.warning(message)
