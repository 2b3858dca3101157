"""The node's web pages, /metrics and health checks (Starlette, served by uvicorn in a
thread of `ichnode serve`).

Pages are rendered on the server and reload themselves, so they work without JavaScript.
Handlers are thin: they parse the request, ask the Dashboard, and render.

Security: by default the pages listen on 127.0.0.1 only, and answer only requests that
name this machine (Host 127.0.0.1 or localhost). Bound to any other address the
config must carry `web.token`, and every page, /metrics and the JSON API then need it (as
`Authorization: Bearer …`, or through the login form's session cookie). Every request that
changes something (the retry and re-analyse buttons) needs the token wherever the pages
listen, with a per-session CSRF value besides the cookie. /healthz and /readyz stay open:
they say nothing about patients, and load balancers probe them without credentials. Every
answer carries the usual security headers and is not cached.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
import urllib.parse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node import plots
from node.config import Config
from node.dashboard import REANALYSIS_TEXTS, Dashboard, QueueFilter, VerdictFilter, as_json
from node.errors import ConfigError, IchNodeError
from node.health import Readiness
from node.metrics import registry
from storage.state import Reanalysis
from training.report import format_interval

__all__ = ["create_app", "WebServer"]

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_COOKIE = "ichnode_session"
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9._~/%-]*")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Adds the security headers to every answer (HSTS too when served over TLS)."""

    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app = app
        self.headers = SECURITY_HEADERS + ([(b"strict-transport-security", b"max-age=31536000")] if tls else [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((n, v) for n, v in self.headers if n not in names)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Access:
    """Who may read and who may change: the token, its session cookie and CSRF value."""

    def __init__(self, token: str, *, reads_need_token: bool) -> None:
        self.token = token
        self.reads_need_token = reads_need_token
        self.session = self._derived("session") if token else ""
        self.csrf = self._derived("csrf") if token else ""

    def _derived(self, purpose: str) -> str:
        """A value derived from the token: the cookie never carries the token itself."""
        return hmac.new(self.token.encode(), f"ichnode-web-{purpose}".encode(), hashlib.sha256).hexdigest()

    def _bearer(self, request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def signed_in(self, request: Request) -> bool:
        if not self.token:
            return False
        bearer = self._bearer(request)
        if bearer is not None:
            return hmac.compare_digest(bearer.encode(), self.token.encode())
        return hmac.compare_digest(request.cookies.get(SESSION_COOKIE, "").encode(), self.session.encode())

    def may_read(self, request: Request) -> bool:
        return not self.reads_need_token or self.signed_in(request)

    def check_change(self, request: Request, form: dict[str, str]) -> Response | None:
        """None when the request may change state; else the 401/403 answer saying why."""
        if not self.token:
            return PlainTextResponse("web.token is not set in the node's config: nothing can be changed from "
                                     "the web pages (use `ichnode retry` or `ichnode reanalyse` on the node)",
                                     status_code=403)
        if self._bearer(request) is not None:
            return None if self.signed_in(request) else PlainTextResponse("wrong token", status_code=403)
        given = form.get("token", "")
        if given:
            return None if hmac.compare_digest(given.encode(), self.token.encode()) else \
                PlainTextResponse("wrong token", status_code=403)
        if not request.cookies.get(SESSION_COOKIE):
            return PlainTextResponse("this needs the admin token (web.token)", status_code=401,
                                     headers={"www-authenticate": "Bearer"})
        if self.signed_in(request) and hmac.compare_digest(form.get("csrf", "").encode(), self.csrf.encode()):
            return None
        return PlainTextResponse("session or form not valid: sign in again", status_code=403)


def create_app(config: Config, dashboard: Dashboard, readiness: Readiness) -> Starlette:
    settings = config.web
    access = Access(settings.token, reads_need_token=not settings.loopback)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
    templates.env.filters["score"] = lambda value: "-" if value is None else f"{value:.3f}"
    templates.env.filters["interval"] = format_interval
    metrics = registry(dashboard)

    def page(request: Request, name: str, refresh: bool = True, status_code: int = 200, **context) -> Response:
        signed_in = access.signed_in(request)
        context |= dict(model=dashboard.model_info, refresh=settings.refresh_seconds if refresh else 0,
                        signed_in=signed_in, csrf=access.csrf if signed_in else "",
                        token_set=bool(settings.token), reads_need_token=access.reads_need_token,
                        silent=config.silent)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def guarded(handler):
        """Pages and data: readable when reads need no token, or by a signed-in caller."""
        async def endpoint(request: Request) -> Response:
            if access.may_read(request):
                return await handler(request)
            if request.url.path.startswith(("/metrics", "/api/")) or "text/html" not in \
                    request.headers.get("accept", ""):
                return PlainTextResponse("this needs the admin token (web.token)", status_code=401,
                                         headers={"www-authenticate": "Bearer"})
            return RedirectResponse("/login?" + urllib.parse.urlencode({"next": request.url.path}), status_code=303)
        return endpoint

    def queue_filter(request: Request) -> QueueFilter:
        """The query string's filter; ValueError naming a bad parameter."""
        params = request.query_params
        return QueueFilter.parse(params.get("state"), params.get("verdict"), params.get("limit"))

    @guarded
    async def queue(request: Request) -> Response:
        try:
            chosen = queue_filter(request)
        except ValueError as exc:
            return page(request, "error.html", refresh=False, status_code=400, message=str(exc))
        view = await run_in_threadpool(dashboard.queue, chosen)
        return page(request, "queue.html", view=view, states=list(view.studies_by_state),
                    verdicts=[str(v) for v in VerdictFilter])

    @guarded
    async def queue_json(request: Request) -> Response:
        try:
            chosen = queue_filter(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(as_json(await run_in_threadpool(dashboard.queue, chosen)))

    @guarded
    async def study(request: Request) -> Response:
        view = await run_in_threadpool(dashboard.study, request.path_params["uid"])
        if view is None:
            return page(request, "error.html", refresh=False, status_code=404,
                        message=f"no study {request.path_params['uid']} on this node")
        reanalysed = REANALYSIS_TEXTS.get(request.query_params.get("reanalysed", ""))
        return page(request, "study.html", view=view, reanalysed=reanalysed)

    @guarded
    async def study_json(request: Request) -> Response:
        view = await run_in_threadpool(dashboard.study, request.path_params["uid"])
        if view is None:
            return JSONResponse({"error": "no such study"}, status_code=404)
        return JSONResponse(as_json(view))

    @guarded
    async def image(request: Request) -> Response:
        png = await run_in_threadpool(dashboard.image_png, request.path_params["uid"], request.path_params["name"])
        if png is None:
            return PlainTextResponse("no such picture", status_code=404)
        return Response(png, media_type="image/png")

    @guarded
    async def failures(request: Request) -> Response:
        view = await run_in_threadpool(dashboard.failures)
        counts = request.query_params.get("retried", "").split(",")
        retried = tuple(map(int, counts)) if len(counts) == 2 and all(c.isdigit() for c in counts) else None
        queued = request.query_params.get("reanalysed", "")
        return page(request, "failures.html", view=view, retried=retried,
                    reanalysed=int(queued) if queued.isdigit() else None,
                    reopen_failed=config.completion.reopen_failed)

    async def refused_change(request: Request, what: str) -> Response | None:
        """The 401/403 answer (logged with the caller's address) when the request may not
        change anything; None when it may."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        refused = access.check_change(request, form)
        if refused is not None:
            log.warning("refused a %s request from %s: %s", what, request.client.host if request.client else "?",
                        refused.body.decode())
        return refused

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    async def retry(request: Request) -> Response:
        if (refused := await refused_change(request, "retry")) is not None:
            return refused
        deliveries, notifications = await run_in_threadpool(dashboard.retry)
        log.info("retry from the web pages: %d deliveries and %d notifications pending again",
                 deliveries, notifications)
        if wants_json(request):
            return JSONResponse({"deliveries": deliveries, "notifications": notifications})
        return RedirectResponse(f"/failures?retried={deliveries},{notifications}", status_code=303)

    async def reanalyse(request: Request) -> Response:
        if (refused := await refused_change(request, "re-analyse")) is not None:
            return refused
        uid = request.path_params["uid"]
        (outcome,) = await run_in_threadpool(dashboard.reanalyse, [uid], "web")
        if outcome.outcome == Reanalysis.UNKNOWN:
            return PlainTextResponse(f"no study {uid} on this node", status_code=404)
        if wants_json(request):
            return JSONResponse(as_json(outcome))
        return RedirectResponse(f"/studies/{uid}?reanalysed={outcome.outcome}", status_code=303)

    async def reanalyse_failed(request: Request) -> Response:
        if (refused := await refused_change(request, "re-analyse")) is not None:
            return refused
        outcomes = await run_in_threadpool(dashboard.reanalyse_failed, "web")
        queued = sum(o.outcome == Reanalysis.QUEUED for o in outcomes)
        if wants_json(request):
            return JSONResponse({"queued": queued})
        return RedirectResponse(f"/failures?reanalysed={queued}", status_code=303)

    @guarded
    async def model(request: Request) -> Response:
        return page(request, "model.html", view=await run_in_threadpool(dashboard.model))

    @guarded
    async def plot(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in plots.PLOTS:
            return PlainTextResponse("no such plot", status_code=404)
        view = await run_in_threadpool(dashboard.model)
        drawn = {"studies-per-day": lambda: plots.studies_per_day(view.days),
                 "positive-rate": lambda: plots.positive_rate_per_day(view.days),
                 "scores": lambda: plots.score_distribution(view.scores)}[name]
        return Response(await run_in_threadpool(drawn), media_type="image/png")

    @guarded
    async def prometheus(request: Request) -> Response:
        return Response(await run_in_threadpool(generate_latest, metrics), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(readiness.checks)
        failing = [c.name for c in checks if not c.ok]
        body = {"status": "ready" if not failing else "not ready", "failing": failing,
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        return JSONResponse(body, status_code=503 if failing else 200)

    async def login(request: Request) -> Response:
        target = request.query_params.get("next", "/")
        target = target if _LOCAL_PATH.fullmatch(target) else "/"  # never a redirect to another site
        if request.method == "GET":
            return page(request, "login.html", refresh=False, next=target, message="")
        form = await request.form()
        given = str(form.get("token", ""))
        if not settings.token or not hmac.compare_digest(given.encode(), settings.token.encode()):
            log.warning("failed sign-in to the web pages from %s", request.client.host if request.client else "?")
            return page(request, "login.html", refresh=False, status_code=403, next=target,
                        message="That is not the node's web.token." if settings.token else
                        "web.token is not set in the node's config, so nobody can sign in.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, access.session, httponly=True, samesite="strict", secure=settings.tls,
                            max_age=12 * 3600)
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    routes = [
        Route("/", queue),
        Route("/api/queue", queue_json),
        Route("/studies/{uid}", study),
        Route("/api/studies/{uid}", study_json),
        Route("/studies/{uid}/images/{name}.png", image),
        Route("/studies/{uid}/reanalyse", reanalyse, methods=["POST"]),
        Route("/failures", failures),
        Route("/failures/retry", retry, methods=["POST"]),
        Route("/failures/reanalyse", reanalyse_failed, methods=["POST"]),
        Route("/model", model),
        Route("/model/{name}.png", plot),
        Route("/metrics", prometheus),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def failed(request: Request, exc: Exception) -> Response:
        log.exception("web request %s failed", request.url.path)
        text = str(exc) if isinstance(exc, IchNodeError) else f"internal error ({type(exc).__name__}); see the node's log"
        return PlainTextResponse(text, status_code=503 if isinstance(exc, IchNodeError) else 500)

    app = Starlette(routes=routes, exception_handlers={Exception: failed})
    if settings.loopback:
        # Pages open to this machine answer only to this machine's names, so a web page
        # elsewhere cannot read them through a DNS name that resolves to 127.0.0.1.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted({"127.0.0.1", "localhost", settings.host}))
    app.add_middleware(SecurityHeaders, tls=settings.tls)
    return app


class WebServer:
    """uvicorn in a thread beside the SCP; `start` returns once it listens or raises."""

    def __init__(self, config: Config, app: Starlette) -> None:
        node = config.node
        self.settings = config.web
        tls = dict(ssl_certfile=str(node.tls_certificate), ssl_keyfile=str(node.tls_private_key)) \
            if self.settings.tls else {}
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=self.settings.host, port=self.settings.port, log_level="warning", access_log=False,
            lifespan="off", server_header=False, **tls))
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the web pages could not listen on {self.settings.url} (web.host, web.port)")
            time.sleep(0.05)
        log.info("web pages, /metrics and /readyz at %s", self.settings.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
