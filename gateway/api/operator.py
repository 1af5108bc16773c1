"""The operator's view: the mesh as this gateway sees it (JSON), the dashboard page, the decision feed.

    GET /v1/meshgate/mesh               sites, pools (health, breaker, RTT, load, predicted TTFT),
                                        the links this gateway measures, recent routing decisions
    GET /v1/meshgate/decisions/stream   routing decisions as they happen (SSE, heartbeats)
    GET /dashboard                      one self-contained HTML page over the two (no external assets)
    GET /v1/meshgate/usage?window_s=S   requests and tokens by model and priority over the last S
                                        seconds (default 3600): a tenant's own; an admin's: every key's
                                        (or one: &key=ID)

With gateway.auth on, the operator's views (the first three, and /v1/meshgate/gateways) need an admin
key (`admin: true` in its entry): other keys are tenants, who get 403 there, since the views show
every tenant's routing decisions and client locations. A key goes as the API takes it,
`Authorization: Bearer KEY`, or HTTP Basic with the key as the password (any user name), which is what
a browser can send: the 401 asks for it, and the browser then sends it with the page's own requests too.
"""
from __future__ import annotations

import base64
import binascii
import time
from functools import cached_property
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from gateway.api.h1 import Request, Response, Router, Stream, error_response, json_response
from gateway.core.errors import APIError, BadRequest, Forbidden
from gateway.core.types import Endpoint, RouteRequest
from gateway.edge.admission import Admission
from gateway.edge.admission import Principal
from gateway.edge.decisions import DecisionLog
from gateway.edge.usage_window import UsageWindow
from gateway.pools.breaker import BreakerState
from gateway.pools.upstream import Upstreams
from gateway.routing.framework import Profile


STATIC = Path(__file__).with_name("static")
# "A typical request": a 512-token prompt from a client at this gateway's site.
TYPICAL_PROMPT_CHARS = 2048
_LAND_MARK = "/*__LAND__*/null"
_BREAKER = {BreakerState.CLOSED: "closed", BreakerState.HALF_OPEN: "half-open", BreakerState.OPEN: "open"}


class OperatorView:
    """Reads only what it shows: the pools, the routing profile, the decision log, the in-flight
    count; and the admission to check keys."""

    def __init__(self, site: str, cfg_sites: tuple[Any, ...], admission: Admission, upstreams: Upstreams,
                 profile: Profile, decisions: DecisionLog, in_flight: Callable[[], int],
                 usage: UsageWindow | None = None):
        self.site = site
        self.usage_window = usage or UsageWindow()
        self.admission = admission
        self.upstreams = upstreams
        self.profile = profile
        self.decisions = decisions
        self.in_flight = in_flight
        self.sites = [{"id": x.id, "name": x.name or x.id, "country": x.country.upper(), "lat": x.lat, "lon": x.lon}
                      for x in cfg_sites]
        self.site_ids = {x["id"] for x in self.sites}

    def add_routes(self, r: Router) -> None:
        r.add("GET", "/v1/meshgate/mesh", self.mesh)
        r.add("GET", "/v1/meshgate/decisions/stream", self.stream)
        r.add("GET", "/dashboard", self.dashboard)
        r.add("GET", "/v1/meshgate/usage", self.usage)

    # -- handlers -------------------------------------------------------------------------
    async def usage(self, request: Request) -> Response:
        """The caller's own usage (a tenant), or every key's (an admin; auth off: everyone's)."""
        principal, denied = self._caller(request)
        if denied is not None:
            return denied
        query = dict(p.partition("=")[::2] for p in request.query.split("&") if p)
        try:
            window_s = float(query.get("window_s", "3600"))
        except ValueError:
            raise BadRequest("'window_s' must be a number of seconds", param="window_s") from None
        limit_s = 60.0 * self.usage_window.retention_min
        if not 0 < window_s <= limit_s:
            raise BadRequest(f"'window_s' must be in (0, {limit_s:g}]", param="window_s")
        key = principal.key_id if principal is not None and not principal.admin else query.get("key")
        rows = self.usage_window.query(window_s, key)
        if principal is not None and not principal.admin:
            for row in rows:
                del row["key"]
        return json_response({"object": "usage", "key": key, "window_s": window_s, "data": rows})

    async def mesh(self, request: Request) -> Response:
        if (denied := self.deny(request)) is not None:
            return denied
        return json_response(self.snapshot())

    async def stream(self, request: Request) -> Response | Stream:
        if (denied := self.deny(request)) is not None:
            return denied
        with self.decisions.subscribe() as feed:  # 503 here, before the stream starts, when refused
            out = request.start_stream(headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
            await out.write(b"retry: 2000\n: meshgate decisions\n\n")
            async for batch in feed:
                if batch is None:
                    await out.write(b": heartbeat\n\n")
                else:
                    await out.write(b"".join(b"event: decision\ndata: " + orjson.dumps(r) + b"\n\n" for r in batch))
            await out.end()
            return out

    async def dashboard(self, request: Request) -> Response:
        if (denied := self.deny(request)) is not None:
            return denied
        return Response(self._page, content_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-cache",
                                 "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                            "script-src 'unsafe-inline'; img-src 'self' data:"})

    @cached_property
    def _page(self) -> bytes:
        """dashboard.html with the land outline inlined: one file, nothing else to fetch."""
        html = (STATIC / "dashboard.html").read_text()
        land = (STATIC / "land.json").read_text()
        return html.replace(_LAND_MARK, land).encode()

    def deny(self, request: Request) -> Response | None:
        """For an operator's view: None when the caller may look (an admin key, or auth off); else the
        answer to send: 401 (asking browsers for Basic auth), 403 (a tenant's key), 429."""
        principal, denied = self._caller(request)
        if denied is None and principal is not None and not principal.admin:
            denied = error_response(Forbidden("This key may not read the operator's views (an admin key may); "
                                              "GET /v1/meshgate/usage has its own usage.", code="admin_only"))
        return denied

    def _caller(self, request: Request) -> tuple[Principal | None, Response | None]:
        """Who asks (None with auth off), or the answer refusing them."""
        if not self.admission.enabled:
            return None, None
        headers: Any = request.headers
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                _, _, key = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                key = ""
            headers = {"authorization": f"Bearer {key}"}
        try:
            return self.admission.authenticate(headers, request.remote), None
        except APIError as e:
            resp = error_response(e)
            if e.status == 401:
                resp.headers = {**(resp.headers or {}), "www-authenticate": 'Basic realm="meshgate", charset="UTF-8"'}
            return None, resp

    # -- the snapshot ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        here = self.site
        pools = [self._pool(p) for p in self.upstreams.pools.values()]
        sites = self.sites + [{"id": sid, "name": sid, "country": "", "lat": None, "lon": None}
                              for sid in sorted({p["site"] for p in pools if p["site"]} - self.site_ids)]
        links: dict[str, dict[str, Any]] = {}
        for p in pools:  # one link per remote site: its best-measured pool
            if p["site"] is None or p["rtt_ms"] is None:
                continue
            link = links.get(p["site"])
            if link is None or p["rtt_ms"] < link["rtt_ms"]:
                links[p["site"]] = {"from": here, "to": p["site"], "rtt_ms": p["rtt_ms"], "rtt_p90_ms": p["rtt_p90_ms"],
                                    "pool": p["id"]}
        return {
            "time": time.time(),
            "gateway": {"site": here, "routing": self.profile.name, "in_flight": self.in_flight(),
                        "typical_prompt_tokens": TYPICAL_PROMPT_CHARS // 4},
            "sites": sites,
            "pools": pools,
            "links": list(links.values()),
            "decisions": self.decisions.snapshot(),
        }

    def _pool(self, pool: Any) -> dict[str, Any]:
        e: Endpoint = pool.endpoint
        # A pool that is down (probes missed, or its breaker is open) has no known load: its last
        # report describes a process that may be gone, so the view says unknown (null), not stale.
        down = not e.healthy or e.breaker_open
        load = None if down else e.load
        capacity = pool.cfg.engine.max_num_seqs if pool.cfg.kind == "meshgate" else None
        return {
            "id": e.pool_id,
            "site": e.site,
            "country": e.country,
            "kind": e.kind,
            "url": _no_credentials(e.url),
            "models": sorted(e.models),
            "healthy": e.healthy,
            "breaker": _BREAKER.get(pool.breaker.state, str(pool.breaker.state)),
            "rtt_ms": _r(e.rtt_ms),
            "rtt_p90_ms": _r(pool.rtt_p90_ms()),
            "prior_rtt_ms": _r(e.prior_rtt_ms),
            "in_flight": e.in_flight,
            "capacity": capacity,
            "queue": {"waiting": load.waiting, "running": load.running} if load is not None else None,
            "kv_use": round(load.kv_blocks_used / load.kv_blocks_total, 4)
            if load is not None and load.kv_blocks_total else None,
            "load_age_s": _r(time.monotonic() - e.load_at) if load is not None else None,
            "load_pushed": e.load_pushed and not down,  # GET /load/stream is up: the load is current
            "predicted_ttft_ms": self._predict_ms(e),
            "late_ms": _r(1000 * e.first_byte_excess_s),  # its part measured late (routing/lateness.py)
        }

    def _predict_ms(self, e: Endpoint) -> float | None:
        predictor = self.profile.predictor
        if predictor is None or not e.models:
            return None
        req = RouteRequest(model=min(e.models), prompt_chars=TYPICAL_PROMPT_CHARS)
        return _r(1000 * predictor.predict_s(req, e))


def _no_credentials(url: str) -> str:
    u = urlsplit(url)
    if u.username is None and u.password is None:
        return url
    host = u.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit((u.scheme, netloc + (f":{u.port}" if u.port else ""), u.path, u.query, u.fragment))


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
