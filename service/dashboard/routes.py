"""The governance dashboard: server-rendered pages under ``/dashboard`` (Jinja2, SVG drawn in Python).

Handlers stay thin: they read with the very functions behind ``/audit`` (the filter dependency, the
record, CSV and verify handlers, ``summarize``) and hand the answers to ``service.dashboard.views``.
Sign-in turns an API key with the audit or admin role into a signed session cookie
(``service.dashboard.session``); every page and asset needs it (pages redirect to the sign-in page, assets
answer 401), and every state-changing form carries a CSRF token. The key itself is never stored or logged.
"""

from __future__ import annotations

import inspect
import re
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from core.vocabulary import METHODS, SEVERITIES
from engine.review_maps import decode_map, legend_png, map_png
from service.app import keys
from service.app.deps import EngineDep, Principal, StateDep, allowed_roles, authenticate_digest, check_key
from service.app.errors import ApiError
from service.app.routes import audit as audit_routes
from service.app.settings import Settings
from service.audit import queries
from service.audit.summary import WINDOWS, requests_over_time, summarize
from service.dashboard import views
from service.dashboard.session import (
    COOKIE_PATH,
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionSigner,
    tokens_match,
)

__all__ = ["install", "router"]

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
ASSETS = frozenset(p.name for p in STATIC.iterdir() if p.is_file())
DASHBOARD_ROLES = allowed_roles("audit")
PAGE_SIZES = (25, 50, 100, 200)
FORM_FIELDS = ("start", "end", "model", "method", "class", "agreement", "severity", "flagged")
_ANCHOR = re.compile(r"^[0-9a-fA-F]{64}$")
LEGEND_PNG = legend_png()

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals.update(fmt=views.fmt, quote=quote)
router = APIRouter(prefix="/dashboard", include_in_schema=False)


class SignInRequired(Exception):
    """A page was asked for without a valid session: answered with a redirect to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def install(app: FastAPI, settings: Settings) -> None:
    """Mount the dashboard on ``app``: its router, the sign-in redirect and the cookie signer (with the
    configured secret, else a random one for this process)."""
    secret = settings.dashboard_secret
    key = secret.get_secret_value().encode() if secret is not None else secrets.token_bytes(32)
    app.state.dashboard_signer = SessionSigner(key, lifetime_s=settings.dashboard_session_minutes * 60)

    async def redirect_to_sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        return _redirect(f"/dashboard/sign-in?next={quote(exc.next_url, safe='')}")

    api_error_handler = app.exception_handlers.get(ApiError)

    async def api_error_page(request: Request, exc: Exception) -> Response:
        """Dashboard pages answer errors (database down, CSRF refused, ...) as a page; the API, the
        dashboard's assets and its CSV keep the JSON error body."""
        assert isinstance(exc, ApiError)
        path = request.url.path
        is_page = path.startswith("/dashboard") and not path.startswith("/dashboard/static/")
        if not is_page or path.endswith((".csv", ".png")):
            assert api_error_handler is not None, "install_error_handlers(app) runs first"
            answer = api_error_handler(request, exc)
            return await answer if inspect.isawaitable(answer) else answer
        response = _render(
            request,
            "error.html",
            {"title": f"Error {exc.status_code}", "messages": [exc.message], "back": "/dashboard"},
            status_code=exc.status_code,
        )
        response.headers.update(exc.headers or {})
        return response

    app.add_exception_handler(SignInRequired, redirect_to_sign_in)
    app.add_exception_handler(ApiError, api_error_page)
    app.include_router(router)


# ------------------------------------------------------------------------------------------ sessions


def _signer(request: Request) -> SessionSigner:
    signer = request.app.state.dashboard_signer
    assert isinstance(signer, SessionSigner)
    return signer


async def _session(request: Request, state: StateDep) -> Session | None:
    """The request's valid session, or None. With auth disabled (loopback only) everyone is admin."""
    signer = _signer(request)
    if not state.settings.auth_enabled:
        return Session(name=None, role="admin", key_sha256="", expires=2**62, csrf=signer.open_csrf)
    session = signer.loads(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    # the key may have been revoked (or its role changed) since sign-in: check again on every request
    principal = await run_in_threadpool(authenticate_digest, state, session.key_sha256)
    if principal is None or principal.role not in DASHBOARD_ROLES:
        return None
    return session


async def page_session(request: Request, session: Annotated[Session | None, Depends(_session)]) -> Session:
    if session is None:
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(url)
    return session


async def asset_session(session: Annotated[Session | None, Depends(_session)]) -> Session:
    if session is None:
        raise ApiError(401, "unauthorized", "sign in to the dashboard first (/dashboard/sign-in)")
    return session


PageSession = Annotated[Session, Depends(page_session)]
AssetSession = Annotated[Session, Depends(asset_session)]


def _principal(session: Session) -> Principal:
    return Principal(name=session.name, role=session.role)


def _safe_next(value: str | None) -> str:
    """Only paths of the dashboard itself (no open redirect)."""
    if value and value.startswith("/dashboard") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard"


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _cookie_options(settings: Settings) -> dict[str, Any]:
    return {
        "path": COOKIE_PATH,
        "httponly": True,
        "samesite": "strict",
        "secure": settings.dashboard_cookie_secure,
    }


def _render(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    session: Session | None = None,
    status_code: int = 200,
) -> Response:
    context = {"session": session, "path": request.url.path, **context}
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    return response


# ------------------------------------------------------------------------------------------ sign-in


def _sign_in_page(
    request: Request, settings: Settings, *, next_url: str, error: str | None, notice: str | None, status: int
) -> Response:
    cookie, token = _signer(request).new_presession()
    response = _render(
        request,
        "sign_in.html",
        {"csrf": token, "next": next_url, "error": error, "notice": notice},
        status_code=status,
    )
    response.set_cookie(PRESESSION_COOKIE, cookie, max_age=3600, **_cookie_options(settings))
    return response


@router.get("/sign-in")
async def sign_in_form(
    request: Request,
    state: StateDep,
    session: Annotated[Session | None, Depends(_session)],
    next: str | None = None,
    signed_out: bool = False,
) -> Response:
    if session is not None:
        return _redirect(_safe_next(next))
    notice = "You are signed out." if signed_out else None
    return _sign_in_page(
        request, state.settings, next_url=_safe_next(next), error=None, notice=notice, status=200
    )


@router.post("/sign-in")
async def sign_in(
    request: Request,
    state: StateDep,
    api_key: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/dashboard",
) -> Response:
    expected = _signer(request).presession_token(request.cookies.get(PRESESSION_COOKIE))
    if not tokens_match(expected, csrf):
        return _sign_in_page(
            request,
            state.settings,
            next_url=_safe_next(next),
            error="The sign-in form expired or did not come from this page (CSRF check failed). "
            "Enter the key again.",
            notice=None,
            status=403,
        )
    try:
        principal = await run_in_threadpool(check_key, state, api_key.strip() or None, DASHBOARD_ROLES)
    except ApiError as exc:
        if exc.status_code not in (401, 403):
            raise
        role = exc.details.get("role") if isinstance(exc.details, dict) else None
        if exc.status_code == 403:
            message = (
                f"This key has the role {role!r}: the dashboard needs a key with the audit or admin role."
            )
        else:
            message = "That key is unknown or revoked." if api_key.strip() else "Enter an API key."
        return _sign_in_page(
            request,
            state.settings,
            next_url=_safe_next(next),
            error=message,
            notice=None,
            status=exc.status_code,
        )
    session = _signer(request).new_session(
        name=principal.name, role=principal.role, key_sha256=keys.hash_key(api_key.strip())
    )
    response = _redirect(_safe_next(next))
    response.set_cookie(
        SESSION_COOKIE,
        _signer(request).dumps(session),
        max_age=_signer(request).lifetime_s,
        **_cookie_options(state.settings),
    )
    response.delete_cookie(PRESESSION_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/sign-out")
async def sign_out(session: PageSession, csrf: Annotated[str, Form()] = "") -> Response:
    if not tokens_match(session.csrf, csrf):
        raise ApiError(403, "csrf_failed", "the sign-out form did not carry this session's CSRF token")
    response = _redirect("/dashboard/sign-in?signed_out=true")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


@router.get("/static/{name}")
async def static(name: str, session: AssetSession) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no dashboard asset {name!r}")
    return FileResponse(STATIC / name, headers={"Cache-Control": "private, max-age=300"})


# ------------------------------------------------------------------------------------------ pages


def _filters_or_error(
    request: Request, session: Session, page: str
) -> tuple[views.ParsedFilters, Response | None]:
    parsed = views.parse_filters(request.query_params)
    if parsed.filters is None:
        return parsed, _render(
            request,
            "error.html",
            {"title": "Invalid filters", "messages": parsed.errors, "back": page},
            session=session,
            status_code=422,
        )
    return parsed, None


def _filter_form_context(state: Any, parsed: views.ParsedFilters) -> dict[str, Any]:
    return {
        "raw": parsed.raw,
        "models": state.ready_names(),
        "methods": [(m, views.method_label(m)) for m in METHODS],
        "severities": list(SEVERITIES),
        # filters /audit/records gains later (e.g. a model version) appear as text fields until styled
        "other_filters": [f for f in views.FILTER_FIELDS if f not in FORM_FIELDS],
    }


@router.get("")
async def overview(
    request: Request, session: PageSession, state: StateDep, engine: EngineDep, window: str = "day"
) -> Response:
    parsed, error = _filters_or_error(request, session, "/dashboard")
    if error is not None:
        return error
    assert parsed.filters is not None
    window = window if window in WINDOWS else "day"
    counts = await audit_routes._call_db(
        engine, requests_over_time, engine, filters=parsed.filters, window=window
    )
    summary = await audit_routes._call_db(
        engine, summarize, engine, filters=parsed.filters, group_by=[window, "model", "method"]
    )
    page = views.overview(
        raw=parsed.raw,
        filters=parsed.filters,
        window=window,
        counts=counts,
        summary=summary,
        served_models=state.ready_names(),
    )
    context = {**_filter_form_context(state, parsed), "page": page, "window": window}
    return _render(request, "overview.html", context, session=session)


@router.get("/records")
async def records(
    request: Request,
    session: PageSession,
    state: StateDep,
    engine: EngineDep,
    limit: str = "50",
    before_id: str = "",
) -> Response:
    parsed, error = _filters_or_error(request, session, "/dashboard/records")
    if error is not None:
        return error
    assert parsed.filters is not None
    size = int(limit) if limit.isdigit() and int(limit) in PAGE_SIZES else 50
    before = int(before_id) if before_id.isdigit() and 1 <= int(before_id) <= audit_routes.MAX_ID else None
    result = await audit_routes.list_records(
        engine=engine, principal=_principal(session), filters=parsed.filters, limit=size, before_id=before
    )
    items = [item.model_dump() for item in result.items]
    query = {**parsed.raw, "limit": size if size != 50 else None}
    context = {
        **_filter_form_context(state, parsed),
        "rows": views.record_rows(items),
        "limit": size,
        "limit_options": [(str(s), str(s)) for s in PAGE_SIZES],
        "before_id": before,
        "newer_href": "/dashboard/records" + views.query_string(query) if before is not None else None,
        "older_href": "/dashboard/records" + views.query_string({**query, "before_id": result.next_before_id})
        if result.next_before_id is not None
        else None,
        "csv_href": "/dashboard/records.csv" + views.query_string(parsed.raw),
        "api_href": "/audit/records" + views.query_string({**parsed.raw, "limit": size, "before_id": before}),
    }
    return _render(request, "records.html", context, session=session)


@router.get("/records.csv")
async def records_csv(request: Request, session: PageSession, engine: EngineDep) -> Response:
    parsed, error = _filters_or_error(request, session, "/dashboard/records")
    if error is not None:
        return error
    assert parsed.filters is not None
    return await audit_routes.export_records_csv(
        engine=engine, principal=_principal(session), filters=parsed.filters
    )


@router.get("/records/{record_id}")
async def record(request: Request, record_id: str, session: PageSession, engine: EngineDep) -> Response:
    if not record_id.isdigit() or not 1 <= int(record_id) <= audit_routes.MAX_ID:
        return _render(
            request,
            "error.html",
            {
                "title": "No such record",
                "messages": [f"{record_id!r} is not a record id"],
                "back": "/dashboard/records",
            },
            session=session,
            status_code=404,
        )
    try:
        found = await audit_routes.get_record(
            record_id=int(record_id), engine=engine, principal=_principal(session)
        )
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        return _render(
            request,
            "error.html",
            {"title": "No such record", "messages": [exc.message], "back": "/dashboard/records"},
            session=session,
            status_code=404,
        )
    item = found.model_dump()
    context = {"record": item, "row": views.record_rows([item])[0], "detail": views.record_detail(item)}
    return _render(request, "record.html", context, session=session)


@router.get("/records/{record_id}/maps/{model}/{method}/{checkpoint}.png")
async def record_map(
    record_id: str, model: str, method: str, checkpoint: str, session: AssetSession, engine: EngineDep
) -> Response:
    """One attribution map a record kept for review (``payload["maps"]``), drawn as a PNG."""
    if not record_id.isdigit() or not 1 <= int(record_id) <= audit_routes.MAX_ID:
        raise ApiError(404, "not_found", f"{record_id!r} is not a record id")
    found = await audit_routes._call_db(engine, queries.get_record, engine, int(record_id))
    try:
        models = ((found or {}).get("maps") or {}).get("models") or {}
        encoded = ((models.get(model) or {}).get(method) or {}).get(checkpoint)
    except AttributeError:  # a stored payload edited into another shape: /audit/verify names the row
        encoded = None
    if not isinstance(encoded, dict):
        raise ApiError(
            404,
            "not_found",
            f"record {record_id} kept no {checkpoint!r} map of {model!r} x {method!r}",
            details={"id": int(record_id), "model": model, "method": method, "checkpoint": checkpoint},
        )
    try:
        png = await run_in_threadpool(lambda: map_png(decode_map(encoded)))
    except ValueError as exc:
        raise ApiError(
            500, "unreadable_map", f"record {record_id}: the kept map cannot be read: {exc}"
        ) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/maps-legend.png")
async def maps_legend(session: AssetSession) -> Response:
    """The colour scale of the kept maps (0 left, 1 right)."""
    return Response(LEGEND_PNG, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/integrity")
async def integrity(
    request: Request, session: PageSession, engine: EngineDep, state: StateDep, anchor: str = ""
) -> Response:
    anchor = anchor.strip()
    anchor_error = None
    if anchor and not _ANCHOR.match(anchor):
        anchor_error = "An anchor is a head hash: 64 hexadecimal characters."
    result = await audit_routes.verify(
        engine=engine,
        settings=state.settings,
        principal=_principal(session),
        anchor=anchor.lower() if anchor and not anchor_error else None,
    )
    context = {"result": result, "anchor": anchor, "anchor_error": anchor_error}
    return _render(
        request, "integrity.html", context, session=session, status_code=422 if anchor_error else 200
    )


@router.get("/models")
async def models(request: Request, session: PageSession, state: StateDep) -> Response:
    snapshot = state.registry.snapshot  # one consistent view
    manifests = {name: _manifest(served.pair) for name, served in snapshot.served.items()}
    versions = {name: (served.identity.digest, served.since) for name, served in snapshot.served.items()}
    # server paths for the admin role only, as in /models
    admin = session.role == "admin"
    folders = snapshot.folders if admin else {}
    failed = [f if admin else replace(f, folder="") for f in snapshot.failed]
    context = {"rows": views.model_rows(manifests, folders, versions), "failed": failed}
    return _render(request, "models.html", context, session=session)


def _manifest(pair: Any) -> dict[str, Any]:
    manifest = getattr(pair, "manifest", None)
    return dict(manifest) if isinstance(manifest, dict) else {}
