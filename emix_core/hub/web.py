"""The hub's pages for people: sign-in by mailed link and code, inbox, package, downloads.

Server-rendered (Jinja templates in ``templates/``, one stylesheet in ``static/``), no
script of our own, nothing from another origin. Every form carries a CSRF token. A page
a visitor may not see answers like a missing one.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import select

from emix_core import __version__
from emix_core.errors import EmixError
from emix_core.hub import sessions as web_sessions
from emix_core.hub.auth import audit_request, client_source
from emix_core.hub.outbox import queue_mail
from emix_core.model import AuditAction, utcnow
from emix_core.store.db import Member, WebIdentity

bp = Blueprint("web", __name__)
log = logging.getLogger("emix.hub")

EMAIL_MAX = 254


def hub() -> Any:
    return current_app.extensions["emix"]


# --------------------------------------------------------------------------- session plumbing


def current_web_session() -> Any:
    """This request's live browser session (cached on ``g``), or ``None``."""
    if "web_session" not in g:
        with hub().db.session() as session:
            g.web_session = web_sessions.load_session(
                session, request.cookies.get(web_sessions.COOKIE)
            )
            g.web_principal = None
            if g.web_session is not None and g.web_session.member_id is not None:
                g.web_principal = web_sessions.principal_for(
                    session, g.web_session.member_id, web_session=g.web_session
                )
    return g.web_session


def web_principal() -> Any:
    """The signed-in member, also set as the request's principal for authorization."""
    current_web_session()
    if g.web_principal is not None:
        g.principal = g.web_principal
    return g.web_principal


class SignInRequired(Exception):
    """Raised by pages that need a signed-in member; answered with the sign-in page."""


def member_required() -> Any:
    principal = web_principal()
    if principal is None:
        raise SignInRequired()
    return principal


@bp.app_errorhandler(SignInRequired)
def _sign_in_required(_exc: SignInRequired) -> Any:
    return render_page("signin.html", status=401, expired=bool(request.cookies.get("emix_session")))


def csrf_token() -> str:
    """The token every form posts back: the session's, or a pre-session double-submit one."""
    ws = current_web_session()
    if ws is not None:
        return ws.csrf
    if "pre_csrf" not in g:
        g.pre_csrf = request.cookies.get(web_sessions.CSRF_COOKIE) or secrets.token_urlsafe(32)
    return g.pre_csrf


def check_csrf() -> None:
    """Refuse a form post whose token is not this browser's (400)."""
    sent = request.form.get("csrf", "")
    ws = current_web_session()
    expected = ws.csrf if ws is not None else request.cookies.get(web_sessions.CSRF_COOKIE, "")
    if not sent or not expected or not hmac.compare_digest(sent, expected):
        abort(400, "the form expired; reload the page and try again")


def secure_cookies() -> bool:
    """Secure cookies, except for a hub whose public URL is plain HTTP (a local test hub)."""
    return not hub().config.hub.public_url.startswith("http://")


@bp.after_app_request
def _set_pre_csrf(response: Response) -> Response:
    if "pre_csrf" in g and request.cookies.get(web_sessions.CSRF_COOKIE) != g.pre_csrf:
        response.set_cookie(
            web_sessions.CSRF_COOKIE,
            g.pre_csrf,
            httponly=True,
            samesite="Strict",
            secure=secure_cookies(),
            path="/",
        )
    return response


def start_session(response: Any, **owner: Any) -> Any:
    with hub().db.session() as session:
        token = web_sessions.open_session(session, **owner)
    return set_session_cookie(response, token)


def set_session_cookie(response: Any, token: str) -> Any:
    """Give the browser the session cookie ``token`` (HttpOnly, SameSite=Lax, Secure)."""
    response.set_cookie(
        web_sessions.COOKIE,
        token,
        httponly=True,
        samesite="Lax",
        secure=secure_cookies(),
        path="/",
        max_age=int(web_sessions.ABSOLUTE.total_seconds()),
    )
    return response


def render_page(template: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("principal", web_principal())
    context.setdefault("patient", None)
    html = render_template(template, csrf=csrf_token(), version=__version__, **context)
    return Response(html, status=status, mimetype="text/html")


def message(title: str, text: str, status: int = 200, **context: Any) -> Response:
    return render_page("message.html", status=status, title=title, text=text, **context)


def error_page(exc: EmixError) -> Response:
    """The page a person sees for an error (the API answers JSON instead)."""
    if exc.http_status == 401:
        return _sign_in_required(SignInRequired())
    title = "Not found" if exc.http_status == 404 else "Something went wrong"
    return message(title, exc.message, status=exc.http_status)


# --------------------------------------------------------------------------- sign-in


@bp.get("/")
def index() -> Any:
    if web_principal() is not None:
        return redirect(url_for("web.inbox"))
    return render_page("signin.html")


@bp.post("/signin")
def request_link() -> Response:
    """Mail a fresh sign-in link to a verified member (same answer for anyone else)."""
    check_csrf()
    email = request.form.get("email", "").strip().lower()[:EMAIL_MAX]
    h = hub()
    source = client_source()
    with h.db.session() as session:
        too_many = web_sessions.throttled(session, f"signin:{source}", 10) or (
            email and web_sessions.throttled(session, f"signin-mail:{email}", 3)
        )
    if too_many:
        return message(
            "Please wait", "Too many sign-in requests. Try again in 15 minutes.", status=429
        )
    members = []
    with h.db.session() as session:
        for member in session.scalars(select(Member).where(Member.email == email)):
            if member.verified:
                members.append((member.email, web_sessions.create_link(session, member.id)))
    # every request counts towards the per-address and per-mailbox limits
    web_sessions.count_attempt(h, f"signin:{source}")
    if email:
        web_sessions.count_attempt(h, f"signin-mail:{email}")
    for address, token in members:
        _mail(
            address,
            "Your emix sign-in link",
            "Use this link to sign in to emix. It works once, for 72 hours:\n\n"
            f"{web_sessions.link_url(h, token)}\n\n"
            "If you did not ask for it, ignore this message.\n",
        )
    return message(
        "Check your mail",
        "If this address belongs to a member of a facility on this hub, a sign-in link "
        "is on its way. It works once, for 72 hours.",
    )


def _mail(to: str, subject: str, body: str) -> None:
    queue_mail(hub(), to, subject, body, "sign-in")


def _masked(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[:1]}{'•' * max(len(local) - 1, 2)}@{domain}"


def _link_or_gone(token: str) -> Any:
    with hub().db.session() as session:
        link = web_sessions.find_link(session, token)
        if link is None:
            return None, None, False
        member = session.get(Member, link.member_id)
        known = session.get(WebIdentity, link.member_id) is not None
        if member is None or not member.verified:
            return None, None, False
        return link, member.email, known


def _gone() -> Response:
    return render_page(
        "signin.html",
        status=404,
        notice="This link has expired or was already used. Ask for a new one below.",
    )


@bp.get("/signin/<token>")
def follow_link(token: str) -> Response:
    link, email, known = _link_or_gone(token)
    if link is None:
        return _gone()
    return render_page(
        "link.html", token=token, email=_masked(email), known=known, code_sent=bool(link.code_hash)
    )


@bp.post("/signin/<token>")
def use_link(token: str) -> Any:
    """Second visit on: sign in. First time: mail a one-time code to the same address."""
    check_csrf()
    h = hub()
    with h.db.session() as session:
        link = web_sessions.find_link(session, token)
        if link is None:
            return _gone()
        member = session.get(Member, link.member_id)
        if member is None or not member.verified:
            return _gone()
        known = session.get(WebIdentity, member.id) is not None
        if web_sessions.throttled(session, f"member:{member.email}") or (
            not known and web_sessions.throttled(session, f"code-mail:{member.email}")
        ):
            return _throttled()
        if known:
            link.used_at = utcnow()
            member_id, package_id = member.id, link.package_id
        else:
            code = web_sessions.new_code(link)
            email = member.email
    if known:
        return _signed_in(member_id, package_id)
    web_sessions.count_attempt(h, f"code-mail:{email}")
    _mail(
        email,
        "Your emix confirmation code",
        f"Your one-time code is {code[:4]} {code[4:]}\n\n"
        "Type it on the page that asked for it. It works once, for 30 minutes.\n"
        "If you did not ask for it, tell your facility's emix administrator.\n",
    )
    return redirect(url_for("web.follow_link", token=token))


def _throttled() -> Response:
    return message(
        "Please wait",
        "Too many codes or wrong codes for this account. Try again in 15 minutes.",
        status=429,
    )


@bp.post("/signin/<token>/code")
def confirm_code(token: str) -> Any:
    check_csrf()
    h = hub()
    source = client_source()
    with h.db.session() as session:
        link = web_sessions.find_link(session, token)
        if link is None:
            return _gone()
        member = session.get(Member, link.member_id)
        key = f"member:{member.email}"
        if web_sessions.throttled(session, key):
            return _throttled()
        ok = web_sessions.code_matches(link, request.form.get("code", "")[:32])
        if ok:
            link.used_at = utcnow()
            link.code_hash = None
            if session.get(WebIdentity, member.id) is None:
                session.add(WebIdentity(member_id=member.id))
            if member.confirmed_at is None:
                member.confirmed_at = utcnow()
            member_id, package_id, email = member.id, link.package_id, member.email
    if not ok:
        web_sessions.record_failure(h, key, source, "wrong confirmation code")
        return render_page(
            "link.html",
            status=400,
            token=token,
            email=_masked(member.email),
            known=False,
            code_sent=True,
            error="That code is not right, or it expired. Check the latest mail and try again.",
        )
    audit_request(
        "user-authentication",
        action=AuditAction.EXECUTE,
        actor=email,
        detail="identity confirmed with a mailed code",
    )
    return _signed_in(member_id, package_id)


def _signed_in(member_id: int, package_id: str | None) -> Any:
    target = f"/packages/{package_id}" if package_id else "/inbox"
    response = start_session(redirect(target, code=303), member_id=member_id)
    with hub().db.session() as session:
        email = session.get(Member, member_id).email
    audit_request(
        "user-authentication",
        action=AuditAction.EXECUTE,
        actor=email,
        detail="signed in to the web",
    )
    return response


@bp.post("/logout")
def logout() -> Any:
    check_csrf()
    principal = web_principal()
    with hub().db.session() as session:
        web_sessions.end_session(session, request.cookies.get(web_sessions.COOKIE))
    if principal is not None:
        audit_request(
            "user-authentication",
            action=AuditAction.EXECUTE,
            actor=principal.email,
            detail="signed out of the web",
        )
    response = redirect("/", code=303)
    response.delete_cookie(web_sessions.COOKIE, path="/")
    return response


@bp.get("/healthz")
def health() -> Response:
    """Liveness: the process answers (a proxy restarts an instance that does not)."""
    return Response("ok\n", mimetype="text/plain")


@bp.get("/readyz")
def ready() -> tuple[Response, int]:
    """Readiness: the database and the blob store answer; 503 naming which does not.

    A load balancer sends requests only to instances that answer 200 here.
    """
    hub = current_app.extensions["emix"]
    checks: dict[str, str] = {}
    for name, probe in (("database", hub.db.ping), ("blobs", _blob_check(hub))):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # reported, never raised: this is the health check
            log.warning("readiness: %s failed: %s", name, type(exc).__name__)
            checks[name] = "unavailable"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"ready": ok, "instance": hub.instance, **checks}), 200 if ok else 503


def _blob_check(hub):  # type: ignore[no-untyped-def]
    return getattr(hub.blobs, "check", lambda: hub.blobs.exists("readyz"))
