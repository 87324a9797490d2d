"""The annotation web app (FastAPI): a login page, the labelling page, and the JSON API both use.

    GET  /                 the next unlabelled item (or the login page's redirect)
    GET  /login, POST /login, POST /logout
    GET  /api/next         {"project", "annotator", "done", "total", "item": {...} | null}
    POST /api/answer       {"item": id, "choice": "A"|"B"|"tie"|"both_bad"} or {"item": id, "ranking": ["B", "A", ...]},
                           optional "comment"; the answer is committed before the reply (which carries the next item)
    GET  /api/items/{id}   one item as this annotator sees it, with their answer if any

Authentication: the annotator's token, from the `forgeline_label_token` cookie (set by the login page; HttpOnly,
SameSite=Strict, so other sites can neither read it nor send it) or an `Authorization: Bearer` header. A token
belongs to one annotator of one project: everything else is answered 404, as if it did not exist.

Each request opens its own SQLite connection (connections are not shared between the server's threads), so any
number of annotators can work at once; writes queue on SQLite's lock (busy_timeout) instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from . import pages, store

COOKIE = "forgeline_label_token"
MAX_LOGIN_BODY = 4096

SECURITY_HEADERS = {
    # no inline script or style, nothing from another origin: model output that slipped through escaping could
    # still not run, and the page needs no network beyond this server
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: int
    choice: Literal["A", "B", "tie", "both_bad"] | None = None
    ranking: list[str] | None = Field(default=None, max_length=store.MAX_RESPONSES)
    comment: str = Field(default="", max_length=store.MAX_COMMENT_CHARS)


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE)


def create_app(db_path: str | Path) -> FastAPI:
    """The app over the label database at `db_path` (checked here, once; requests open it without checks)."""
    db_path = Path(db_path)
    store.open_database(db_path).close()
    app = FastAPI(title="forgeline label", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def annotator(request: Request) -> store.Annotator | None:
        with store.connection(db_path) as conn:
            return store.annotator_for_token(conn, _token(request))

    def api_annotator(who: store.Annotator | None = Depends(annotator)) -> store.Annotator:
        if who is None:
            raise HTTPException(401, "log in first: a valid access token is needed", {"WWW-Authenticate": "Bearer"})
        return who

    def state(conn, who: store.Annotator) -> dict[str, Any]:
        done, total = store.progress(conn, who)
        item = store.next_item(conn, who)
        return {"project": who.project, "annotator": who.name, "done": done, "total": total,
                "item": None if item is None else item.public()}

    @app.get("/", response_class=HTMLResponse)
    def label_page(who: store.Annotator | None = Depends(annotator)) -> Response:
        if who is None:
            return RedirectResponse("/login", status_code=303)
        with store.connection(db_path) as conn:
            done, total = store.progress(conn, who)
            item = store.next_item(conn, who)
        return HTMLResponse(pages.render("label.html", project=who.project, annotator=who.name, done=done,
                                         total=total, item=item, max_comment=store.MAX_COMMENT_CHARS))

    @app.get("/login", response_class=HTMLResponse)
    def login_page() -> HTMLResponse:
        return HTMLResponse(pages.render("login.html", error=None))

    @app.post("/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        token = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace")).get("token", [""])[0].strip()
        with_token = await run_in_threadpool(_annotator_for, db_path, token)
        if with_token is None:
            return HTMLResponse(pages.render("login.html", error="That token is not valid."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/api/next")
    def api_next(who: store.Annotator = Depends(api_annotator)) -> dict[str, Any]:
        with store.connection(db_path) as conn:
            return state(conn, who)

    @app.post("/api/answer")
    def api_answer(answer: AnswerIn, who: store.Annotator = Depends(api_annotator)) -> dict[str, Any]:
        with store.connection(db_path) as conn:
            try:
                kind = store.record_answer(conn, who, answer.item, choice=answer.choice, ranking=answer.ranking,
                                           comment=answer.comment)
            except store.ItemNotFound as exc:
                raise HTTPException(404, str(exc)) from None
            except store.AlreadyAnswered as exc:
                raise HTTPException(409, str(exc)) from None
            except store.InvalidAnswer as exc:
                raise HTTPException(422, str(exc)) from None
            # committed (write_transaction has returned): only now is the next item read and the reply sent
            return {"saved": {"item": answer.item, "kind": kind}, **state(conn, who)}

    @app.get("/api/items/{item_id}")
    def api_item(item_id: int, who: store.Annotator = Depends(api_annotator)) -> dict[str, Any]:
        with store.connection(db_path) as conn:
            item = store.shown_item(conn, who, item_id)
            if item is None:
                raise HTTPException(404, f"no item {item_id} in this project")
            return {"item": item.public(), "answer": store.own_answer(conn, who, item)}

    @app.get("/static/label.js")
    def script() -> Response:
        return Response(pages.JS, media_type="text/javascript; charset=utf-8")

    @app.get("/static/label.css")
    def stylesheet() -> Response:
        return Response(pages.CSS, media_type="text/css; charset=utf-8")

    return app


def _annotator_for(db_path: Path, token: str) -> store.Annotator | None:
    with store.connection(db_path) as conn:
        return store.annotator_for_token(conn, token)
