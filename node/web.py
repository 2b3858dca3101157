"""The node's web pages, /metrics and health checks (Starlette, served by uvicorn in a
thread of `ichnode serve`).

Pages are rendered on the server and reload themselves, so they work without JavaScript.
Handlers are thin: they parse the request, ask the Dashboard, and render.

Security: by default the pages listen on 127.0.0.1 only, and answer only requests that
name this machine (Host 127.0.0.1 or localhost). Bound to any other address the
config must carry `web.token`, and every page, /metrics and the JSON API then need it (as
`Authorization: Bearer …`, or through the login form's session cookie). Every request that
changes something (the retry and re-analyse buttons) needs the token wherever the pages
listen, with the session's CSRF value besides the cookie. /healthz and /readyz stay open:
they say nothing about patients, and load balancers probe them without credentials. Every
answer carries the usual security headers and is not cached. A request body may be at most
FORM_LIMIT bytes, and credentials in headers are checked before a form is parsed, so that
no unauthenticated peer makes the node buffer or parse megabytes.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from node.dashboard import REANALYSIS_TEXTS, Dashboard, QueueFilter, Undelivered, VerdictFilter, as_json
from node.errors import IchNodeError
from node.health import Readiness
from node.metrics import registry
from node.stow_in import PATH_PREFIX, StowReceiver
from storage.state import Reanalysis
from training.report import format_interval

__all__ = ["FORM_LIMIT", "Sessions", "create_app"]

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_COOKIE = "ichnode_session"
# The pages' forms carry a token or a CSRF value: a few hundred bytes.
FORM_LIMIT = 16 * 1024
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


def figure(value: object) -> str:
    """A number as a person reads it: 0.982, not 0.9815455594002307."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def shown_path(path: object, config_file: Path | None) -> str:
    """A path from the config as the admin wrote it: relative to the config file's folder
    when inside it (the machine's absolute paths say nothing to the reader)."""
    if path is None or path == "":
        return ""
    if config_file is None:
        return str(path)
    for folder in (config_file.absolute().parent, config_file.resolve().parent):  # as written, and as anchored
        if Path(path).is_relative_to(folder):
            return str(Path(path).relative_to(folder))
    return str(path)


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


class BodyLimit:
    """Reads each request's body, at most `limit` bytes, before the app sees it. A larger one
    is answered 413 and the connection closed: unread when Content-Length says so, read no
    further than the limit when it comes chunked. Paths under `own_limits` are passed on
    unread: their handler streams the body and enforces limits of its own (STOW-RS)."""

    def __init__(self, app: ASGIApp, *, limit: int, own_limits: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.own_limits = own_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.own_limits and scope["path"].startswith(self.own_limits)):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self.too_large(scope, receive, send)
            return
        body = bytearray()
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the peer left, or was closed for being too slow: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self.too_large(scope, receive, send)
                return
            more_body = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = PlainTextResponse(f"a request body may be at most {self.limit} bytes", status_code=413,
                                   headers={"connection": "close"})
        await answer(scope, receive, send)


@dataclass
class Session:
    """One sign-in: its CSRF value, and when it began and was last used (monotonic seconds)."""

    csrf: str
    began: float
    used: float


class Sessions:
    """Sign-ins to the pages, in this process's memory: each gets a random cookie value and
    CSRF value of its own, and ends at sign-out, `lifetime` seconds after it began or `idle`
    seconds after its last request, whichever comes first. A restart ends them all, and
    several serve processes each keep their own."""

    def __init__(self, *, lifetime: float, idle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime = lifetime
        self.idle = idle
        self.clock = clock
        self.open: dict[str, Session] = {}

    def begin(self) -> str:
        """A new session's cookie value (expired sessions are forgotten here, so they never pile up)."""
        now = self.clock()
        self.open = {key: session for key, session in self.open.items() if self._alive(session, now)}
        key = secrets.token_urlsafe(32)
        self.open[key] = Session(csrf=secrets.token_urlsafe(32), began=now, used=now)
        return key

    def find(self, key: str) -> Session | None:
        """The live session of this cookie value, now used again; None if there is none."""
        now = self.clock()
        session = self.open.get(key)
        if session is None or not self._alive(session, now):
            self.open.pop(key, None)
            return None
        session.used = now
        return session

    def end(self, key: str) -> None:
        self.open.pop(key, None)

    def _alive(self, session: Session, now: float) -> bool:
        return now - session.began < self.lifetime and now - session.used < self.idle


@dataclass(frozen=True)
class Refusal:
    """Why a request may not change anything: a page for a browser, plain text for a script."""

    status_code: int
    message: str
    sign_in: bool = True  # signing in would help (not when web.token is unset)


class Access:
    """Who may read and who may change: the token, and the sessions signed in with it."""

    def __init__(self, token: str, sessions: Sessions, *, reads_need_token: bool) -> None:
        self.token = token
        self.sessions = sessions
        self.reads_need_token = reads_need_token

    def _bearer(self, request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _is_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def session(self, request: Request) -> Session | None:
        """The caller's live session (none without web.token: nobody can sign in then)."""
        cookie = request.cookies.get(SESSION_COOKIE)
        return self.sessions.find(cookie) if self.token and cookie else None

    def signed_in(self, request: Request) -> bool:
        if not self.token:
            return False
        bearer = self._bearer(request)
        if bearer is not None:
            return self._is_token(bearer)
        return self.session(request) is not None

    def may_read(self, request: Request) -> bool:
        return not self.reads_need_token or self.signed_in(request)

    async def check_change(self, request: Request) -> Refusal | None:
        """None when the request may change state; else why not (401/403). A bearer header
        decides without the body; the form is parsed only when it must."""
        if not self.token:
            return Refusal(403, "web.token is not set in the node's config: nothing can be changed from the web "
                                "pages (use `ichnode retry` or `ichnode reanalyse` on the node)", sign_in=False)
        bearer = self._bearer(request)
        if bearer is not None:
            return None if self._is_token(bearer) else Refusal(403, "wrong token")
        form = await request.form()
        given = str(form.get("token", ""))
        if given:
            return None if self._is_token(given) else Refusal(403, "wrong token")
        if not request.cookies.get(SESSION_COOKIE):
            return Refusal(401, "this needs the admin token (web.token)")
        session = self.session(request)
        if session is not None and hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
            return None
        return Refusal(403, "session or form not valid: sign in again")


def create_app(config: Config, dashboard: Dashboard, readiness: Readiness,
               stow: StowReceiver | None = None) -> Starlette:
    """The pages; with `stow`, STOW-RS receive under /dicomweb/ too (dicomweb.enabled)."""
    settings = config.web
    sessions = Sessions(lifetime=settings.session_hours * 3600, idle=settings.session_idle_minutes * 60)
    access = Access(settings.token, sessions, reads_need_token=not settings.loopback)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
    templates.env.filters["score"] = lambda value: "-" if value is None else f"{value:.3f}"
    templates.env.filters["interval"] = format_interval
    metrics = registry(dashboard)

    templates.env.filters["figure"] = figure
    templates.env.filters["shown_path"] = lambda value: shown_path(value, config.source)

    async def banner(request: Request) -> tuple[Undelivered, ...]:
        """The flagged studies whose results have not reached the PACS, for whoever may read
        the pages; none when the database cannot say (the page itself then says why)."""
        if not access.may_read(request):
            return ()
        try:
            return await run_in_threadpool(dashboard.undelivered)
        except IchNodeError as exc:
            log.warning("the pages' banner of undelivered results is left out: %s", exc)
            return ()

    async def page(request: Request, name: str, refresh: bool = True, status_code: int = 200,
                   **context) -> Response:
        session = access.session(request)
        context |= dict(model=dashboard.model_info, refresh=settings.refresh_seconds if refresh else 0,
                        signed_in=access.signed_in(request), csrf=session.csrf if session else "",
                        token_set=bool(settings.token), reads_need_token=access.reads_need_token,
                        silent=config.silent, undelivered=await banner(request),
                        undelivered_after=config.alerts.undelivered_after_seconds)
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
            return await page(request, "error.html", refresh=False, status_code=400, message=str(exc))
        view = await run_in_threadpool(dashboard.queue, chosen)
        return await page(request, "queue.html", view=view, states=list(view.studies_by_state),
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
            return await page(request, "error.html", refresh=False, status_code=404,
                        message=f"no study {request.path_params['uid']} on this node")
        reanalysed = REANALYSIS_TEXTS.get(request.query_params.get("reanalysed", ""))
        return await page(request, "study.html", view=view, reanalysed=reanalysed)

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
        return await page(request, "failures.html", view=view, retried=retried,
                    reanalysed=int(queued) if queued.isdigit() else None,
                    reopen_failed=config.completion.reopen_failed)

    async def refused_change(request: Request, what: str) -> Response | None:
        """The 401/403 answer (logged with the caller's address) when the request may not
        change anything, as a page with a way back for a browser; None when it may."""
        refused = await access.check_change(request)
        if refused is None:
            return None
        log.warning("refused a %s request from %s: %s", what, request.client.host if request.client else "?",
                    refused.message)
        if "text/html" in request.headers.get("accept", ""):
            back = request.url.path.rsplit("/", 1)[0]  # the page whose button was pressed
            return await page(request, "error.html", refresh=False, status_code=refused.status_code,
                              title="Not allowed", message=refused.message, back=back,
                              sign_in="/login?" + urllib.parse.urlencode({"next": back}) if refused.sign_in else "")
        return PlainTextResponse(refused.message, status_code=refused.status_code,
                                 headers={"www-authenticate": "Bearer"} if refused.status_code == 401 else None)

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
        return await page(request, "model.html", view=await run_in_threadpool(dashboard.model))

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
        degraded = [c.name for c in checks if c.degraded]
        status = "not ready" if failing else "degraded" if degraded else "ready"
        body = {"status": status, "failing": failing, "degraded": degraded,
                "checks": {c.name: {"ok": c.ok, "degraded": c.degraded, "detail": c.detail} for c in checks}}
        code = 503 if failing else config.alerts.undelivered_http_status if degraded else 200
        return JSONResponse(body, status_code=code)

    async def login(request: Request) -> Response:
        target = request.query_params.get("next", "/")
        target = target if _LOCAL_PATH.fullmatch(target) else "/"  # never a redirect to another site
        if request.method == "GET":
            return await page(request, "login.html", refresh=False, next=target, message="")
        form = await request.form()
        given = str(form.get("token", ""))
        if not settings.token or not hmac.compare_digest(given.encode(), settings.token.encode()):
            log.warning("failed sign-in to the web pages from %s", request.client.host if request.client else "?")
            return await page(request, "login.html", refresh=False, status_code=403, next=target,
                        message="That is not the node's web.token." if settings.token else
                        "web.token is not set in the node's config, so nobody can sign in.")
        sessions.end(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, sessions.begin(), httponly=True, samesite="strict", secure=settings.tls,
                            max_age=round(sessions.lifetime))
        return response

    async def logout(request: Request) -> Response:
        sessions.end(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=settings.tls)
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
    if stow is not None:
        routes += [Route(f"{PATH_PREFIX}studies", stow.store, methods=["POST"]),
                   Route(f"{PATH_PREFIX}studies/{{study}}", stow.store, methods=["POST"])]

    async def failed(request: Request, exc: Exception) -> Response:
        log.exception("web request %s failed", request.url.path)
        text = str(exc) if isinstance(exc, IchNodeError) else f"internal error ({type(exc).__name__}); see the node's log"
        return PlainTextResponse(text, status_code=503 if isinstance(exc, IchNodeError) else 500)

    app = Starlette(routes=routes, exception_handlers={Exception: failed})
    app.add_middleware(BodyLimit, limit=FORM_LIMIT, own_limits=(PATH_PREFIX,) if stow is not None else ())
    if settings.loopback:
        # Pages open to this machine answer only to this machine's names, so a web page
        # elsewhere cannot read them through a DNS name that resolves to 127.0.0.1.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted({"127.0.0.1", "localhost", settings.host}))
    app.add_middleware(SecurityHeaders, tls=settings.tls)
    return app
