"""The label database: one SQLite file holding projects, their items and responses, annotators and answers.

Durability: the file is in WAL mode and every connection runs with ``synchronous=FULL``, so a committed answer is
in the write-ahead log on disk before the commit returns; the server sends its reply only after that. Each request
(or thread) opens its own connection with a ``busy_timeout``, and every write takes the write lock up front
(``BEGIN IMMEDIATE``): a deferred transaction that reads first and then writes can fail at once with SQLITE_BUSY
under concurrent writers instead of waiting.

Tokens: an annotator's access token is shown once when made; the database keeps only its sha256. The tokens are 192
random bits, so a fast hash is enough (there is nothing to brute-force that a slow hash would protect).

Order: each annotator sees an item's responses in their own random order (``orders``, stored when the annotator is
added); the client speaks of display labels A, B, C... and the store maps them back to the responses' slots.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ForgelineError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000
MAX_RESPONSES = 26  # one display letter each
MAX_COMMENT_CHARS = 10_000
LABELS = string.ascii_uppercase

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE projects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    settings TEXT NOT NULL
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    position INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    UNIQUE (project_id, position)
);
CREATE TABLE responses (
    item_id INTEGER NOT NULL REFERENCES items(id),
    slot INTEGER NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (item_id, slot)
) WITHOUT ROWID;
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    UNIQUE (project_id, name)
);
CREATE TABLE orders (
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    slots TEXT NOT NULL,
    PRIMARY KEY (annotator_id, item_id)
) WITHOUT ROWID;
CREATE TABLE answers (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    kind TEXT NOT NULL CHECK (kind IN ('preferred', 'ranked', 'tie', 'both_bad')),
    ranking TEXT,
    shown TEXT NOT NULL,
    comment TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (annotator_id, item_id)
);
"""

# What an answer can be: a strict preference between two responses, a full ranking, or neither (two responses only).
KINDS = ("preferred", "ranked", "tie", "both_bad")
CHOICES = ("A", "B", "tie", "both_bad")


class LabelStoreError(ForgelineError):
    """The label database is missing, not a label database, or lacks the project or annotator asked for."""


class AnswerError(ForgelineError):
    """An answer the store refuses; the subclass says why (the server maps each to an HTTP status)."""


class ItemNotFound(AnswerError):
    """The item does not exist in the annotator's project (another project's items look the same as none)."""


class AlreadyAnswered(AnswerError):
    """The annotator has answered this item before; answers are final."""


class InvalidAnswer(AnswerError):
    """The answer does not fit the item (a choice for three responses, a ranking that is not a permutation)."""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    project_id: int
    project: str


@dataclass(frozen=True)
class ShownItem:
    """An item as one annotator sees it: responses in their stored order, labelled A, B, ..., models hidden."""

    id: int
    prompt: str | list[dict[str, str]]
    labels: tuple[str, ...]
    texts: tuple[str, ...]
    slots: tuple[int, ...]  # slots[i] is the response shown under labels[i]

    @property
    def mode(self) -> str:
        return "choice" if len(self.labels) == 2 else "ranking"

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "mode": self.mode,
                "responses": [{"label": label, "text": text} for label, text in zip(self.labels, self.texts)]}


@dataclass(frozen=True)
class NewItem:
    prompt: str | list[dict[str, str]]
    responses: tuple[tuple[str, str], ...]  # (model, text) per slot


@dataclass(frozen=True)
class AnswerRecord:
    """One stored answer with what export needs: the ranking is of slots, best first (None for tie / both bad)."""

    item_id: int
    annotator: str
    kind: str
    ranking: tuple[int, ...] | None
    comment: str
    prompt: str | list[dict[str, str]]
    responses: tuple[tuple[str, str], ...]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _open(path: Path, *, create: bool = False) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module opens no transaction behind our back; each write says BEGIN IMMEDIATE.
    # mode=rw unless creating: a database deleted under a running server must not come back as an empty file.
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    return _configure(sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000))


def open_database(path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection to the label database at `path`, checked to be one (and made, with `create`, if absent)."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise LabelStoreError(f"{path}: no such label database (make one with `forgeline label create`)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabelStoreError(f"cannot make the directory {path.parent}: {exc.strerror or exc}") from None
    elif not path.is_file():
        raise LabelStoreError(f"{path} is not a file")
    try:
        conn = _open(path, create=create)
    except sqlite3.Error as exc:
        raise LabelStoreError(f"cannot open {path} as an SQLite database ({exc})") from None
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and create:
            _init_schema(conn)
        elif "meta" not in tables:
            raise LabelStoreError(f"{path} is an SQLite database but not a forgeline label database")
        else:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if version is None or int(version[0]) != SCHEMA_VERSION:
                raise LabelStoreError(f"{path} has label schema version {version and version[0]}; this forgeline "
                                      f"reads version {SCHEMA_VERSION}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LabelStoreError(f"cannot open {path} as an SQLite database ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _init_schema(conn: sqlite3.Connection) -> None:
    # WAL is a property of the file: set once here, every later connection gets it
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise LabelStoreError(f"the database could not be put in WAL mode (journal_mode is {mode}); is it on a "
                              "filesystem without shared-memory support?")
    # statement by statement: executescript would commit the open transaction first and run the rest outside it
    with write_transaction(conn):
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception). The COMMIT has returned, durably, when this exits."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def connection(path: str | Path) -> Iterator[sqlite3.Connection]:
    """One short-lived connection to a database already checked with open_database (the server opens one per
    request: sqlite3 connections must not be shared between the server's worker threads)."""
    conn = _open(Path(path))
    try:
        yield conn
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# projects and annotators
# ---------------------------------------------------------------------------------------------------------------


def create_project(conn: sqlite3.Connection, name: str, items: Sequence[NewItem], settings: dict[str, Any],
                   annotators: Sequence[str] = ()) -> dict[str, str]:
    """Store a project with its items and annotators in one transaction; returns each annotator's token (the only
    time it exists outside the hands of whoever runs this)."""
    check_name(name, "project name")
    with write_transaction(conn):
        if conn.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
            raise LabelStoreError(f"project {name!r} already exists in this database")
        project_id = conn.execute("INSERT INTO projects (name, created_at, settings) VALUES (?, ?, ?)",
                                  (name, _now(), json.dumps(settings, ensure_ascii=False))).lastrowid
        for position, item in enumerate(items):
            item_id = conn.execute("INSERT INTO items (project_id, position, prompt) VALUES (?, ?, ?)",
                                   (project_id, position, json.dumps(item.prompt, ensure_ascii=False))).lastrowid
            conn.executemany("INSERT INTO responses (item_id, slot, model, text) VALUES (?, ?, ?, ?)",
                             [(item_id, slot, model, text) for slot, (model, text) in enumerate(item.responses)])
        return {who: _insert_annotator(conn, project_id, who) for who in annotators}


def add_annotator(conn: sqlite3.Connection, project: str, name: str) -> str:
    with write_transaction(conn):
        return _insert_annotator(conn, project_id_of(conn, project), name)


def check_name(name: str, what: str) -> None:
    if not name or name != name.strip() or any(not c.isprintable() for c in name) or len(name) > 200:
        raise LabelStoreError(f"{what} {name!r} must be 1-200 printable characters without leading or trailing "
                              "spaces")


def _insert_annotator(conn: sqlite3.Connection, project_id: int, name: str) -> str:
    check_name(name, "annotator name")
    if conn.execute("SELECT 1 FROM annotators WHERE project_id = ? AND name = ?", (project_id, name)).fetchone():
        raise LabelStoreError(f"annotator {name!r} already exists in this project")
    token = secrets.token_urlsafe(24)
    annotator_id = conn.execute(
        "INSERT INTO annotators (project_id, name, token_sha256, created_at) VALUES (?, ?, ?, ?)",
        (project_id, name, token_hash(token), _now())).lastrowid
    rng = random.SystemRandom()
    rows = []
    for item_id, k in conn.execute("SELECT i.id, COUNT(*) FROM items i JOIN responses r ON r.item_id = i.id "
                                   "WHERE i.project_id = ? GROUP BY i.id", (project_id,)):
        slots = list(range(k))
        rng.shuffle(slots)
        rows.append((annotator_id, item_id, json.dumps(slots)))
    conn.executemany("INSERT INTO orders (annotator_id, item_id, slots) VALUES (?, ?, ?)", rows)
    return token


def project_id_of(conn: sqlite3.Connection, project: str) -> int:
    row = conn.execute("SELECT id FROM projects WHERE name = ?", (project,)).fetchone()
    if row is None:
        known = [r[0] for r in conn.execute("SELECT name FROM projects ORDER BY name")]
        raise LabelStoreError(f"no project {project!r} in this database (projects: {', '.join(known) or 'none'})")
    return row[0]


def annotator_for_token(conn: sqlite3.Connection, token: str | None) -> Annotator | None:
    if not token:
        return None
    row = conn.execute("SELECT a.id, a.name, a.project_id, p.name FROM annotators a JOIN projects p "
                       "ON p.id = a.project_id WHERE a.token_sha256 = ?", (token_hash(token),)).fetchone()
    return None if row is None else Annotator(*row)


# ---------------------------------------------------------------------------------------------------------------
# what an annotator sees, and their answers
# ---------------------------------------------------------------------------------------------------------------


def progress(conn: sqlite3.Connection, who: Annotator) -> tuple[int, int]:
    """(items this annotator has answered, items in their project)."""
    done = conn.execute("SELECT COUNT(*) FROM answers WHERE annotator_id = ?", (who.id,)).fetchone()[0]
    total = conn.execute("SELECT COUNT(*) FROM items WHERE project_id = ?", (who.project_id,)).fetchone()[0]
    return done, total


def display_order(conn: sqlite3.Connection, who: Annotator, item_id: int) -> tuple[int, ...] | None:
    """The slots of the item's responses in the order `who` sees them, or None when the item is not in their
    project (the project check is here: every way to an item goes through it)."""
    row = conn.execute("SELECT o.slots FROM orders o JOIN items i ON i.id = o.item_id "
                       "WHERE o.annotator_id = ? AND o.item_id = ? AND i.project_id = ?",
                       (who.id, item_id, who.project_id)).fetchone()
    return None if row is None else tuple(json.loads(row[0]))


def shown_item(conn: sqlite3.Connection, who: Annotator, item_id: int) -> ShownItem | None:
    """The item as `who` sees it, or None when it is not in their project."""
    slots = display_order(conn, who, item_id)
    if slots is None:
        return None
    prompt = conn.execute("SELECT prompt FROM items WHERE id = ?", (item_id,)).fetchone()[0]
    texts = dict(conn.execute("SELECT slot, text FROM responses WHERE item_id = ?", (item_id,)).fetchall())
    return ShownItem(id=item_id, prompt=json.loads(prompt), labels=tuple(LABELS[:len(slots)]),
                     texts=tuple(texts[s] for s in slots), slots=slots)


def next_item(conn: sqlite3.Connection, who: Annotator) -> ShownItem | None:
    """The first item of the project (in the order it was created) this annotator has not answered; every
    annotator walks the items in the same order, so items get their second label early (for agreement)."""
    row = conn.execute("SELECT i.id FROM items i WHERE i.project_id = ? AND NOT EXISTS (SELECT 1 FROM answers a "
                       "WHERE a.annotator_id = ? AND a.item_id = i.id) ORDER BY i.position LIMIT 1",
                       (who.project_id, who.id)).fetchone()
    return None if row is None else shown_item(conn, who, row[0])


def own_answer(conn: sqlite3.Connection, who: Annotator, item: ShownItem) -> dict[str, Any] | None:
    """This annotator's answer to `item`, in their own display labels."""
    row = conn.execute("SELECT kind, ranking, comment, created_at FROM answers WHERE annotator_id = ? AND "
                       "item_id = ?", (who.id, item.id)).fetchone()
    if row is None:
        return None
    kind, ranking, comment, created_at = row
    label_of = {slot: label for label, slot in zip(item.labels, item.slots)}
    answer: dict[str, Any] = {"kind": kind, "comment": comment, "created_at": created_at}
    if ranking is not None:
        answer["ranking"] = [label_of[s] for s in json.loads(ranking)]
    return answer


def _resolve(item_id: int, slots: tuple[int, ...], choice: str | None, ranking: Sequence[str] | None
             ) -> tuple[str, list[int] | None]:
    """(kind, ranking of slots best first) from an answer in display labels; `slots` is the display order."""
    if (choice is None) == (ranking is None):
        raise InvalidAnswer("give either 'choice' or 'ranking'")
    labels = LABELS[:len(slots)]
    slot_of = dict(zip(labels, slots))
    if choice is not None:
        if len(slots) != 2:
            raise InvalidAnswer(f"item {item_id} has {len(slots)} responses: rank them all ('ranking')")
        if choice not in CHOICES:
            raise InvalidAnswer(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if choice in ("tie", "both_bad"):
            return choice, None
        other = "B" if choice == "A" else "A"
        return "preferred", [slot_of[choice], slot_of[other]]
    ranking = list(ranking)
    if sorted(ranking) != sorted(labels):
        raise InvalidAnswer(f"ranking must list each of {', '.join(labels)} once, best first; got "
                            f"{', '.join(map(str, ranking)) or 'nothing'}")
    return "ranked", [slot_of[label] for label in ranking]


def record_answer(conn: sqlite3.Connection, who: Annotator, item_id: int, *, choice: str | None = None,
                  ranking: Sequence[str] | None = None, comment: str = "") -> str:
    """Validate and commit one answer (returns its kind). When this returns, the answer is durably on disk."""
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidAnswer(f"the comment has {len(comment)} characters; at most {MAX_COMMENT_CHARS}")
    with write_transaction(conn):
        shown = display_order(conn, who, item_id)
        if shown is None:
            raise ItemNotFound(f"no item {item_id} in this project")
        kind, best_first = _resolve(item_id, shown, choice, ranking)
        if conn.execute("SELECT 1 FROM answers WHERE annotator_id = ? AND item_id = ?",
                        (who.id, item_id)).fetchone():
            raise AlreadyAnswered(f"item {item_id} is already answered")
        conn.execute("INSERT INTO answers (item_id, annotator_id, kind, ranking, shown, comment, created_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (item_id, who.id, kind, None if best_first is None else json.dumps(best_first),
                      json.dumps(shown), comment, _now()))
    return kind


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


def project_answers(conn: sqlite3.Connection, project: str) -> tuple[dict[str, Any], list[AnswerRecord]]:
    """(the project's summary: items, annotators, settings; every answer with its item), in item then annotator
    order. Read in one transaction, so answers arriving meanwhile are either all in or all out."""
    pid = project_id_of(conn, project)
    conn.execute("BEGIN")
    try:
        settings = json.loads(conn.execute("SELECT settings FROM projects WHERE id = ?", (pid,)).fetchone()[0])
        n_items = conn.execute("SELECT COUNT(*) FROM items WHERE project_id = ?", (pid,)).fetchone()[0]
        annotators = [r[0] for r in conn.execute("SELECT name FROM annotators WHERE project_id = ? ORDER BY id",
                                                 (pid,))]
        responses: dict[int, list[tuple[str, str]]] = {}
        prompts: dict[int, Any] = {}
        for item_id, prompt in conn.execute("SELECT id, prompt FROM items WHERE project_id = ?", (pid,)):
            prompts[item_id] = json.loads(prompt)
        for item_id, model, text in conn.execute("SELECT r.item_id, r.model, r.text FROM responses r JOIN items i "
                                                 "ON i.id = r.item_id WHERE i.project_id = ? ORDER BY r.item_id, "
                                                 "r.slot", (pid,)):
            responses.setdefault(item_id, []).append((model, text))
        records = [
            AnswerRecord(item_id=item_id, annotator=name, kind=kind,
                         ranking=None if ranking is None else tuple(json.loads(ranking)), comment=comment,
                         prompt=prompts[item_id], responses=tuple(responses[item_id]))
            for item_id, name, kind, ranking, comment in conn.execute(
                "SELECT a.item_id, n.name, a.kind, a.ranking, a.comment FROM answers a JOIN annotators n "
                "ON n.id = a.annotator_id JOIN items i ON i.id = a.item_id WHERE i.project_id = ? "
                "ORDER BY i.position, n.id", (pid,))
        ]
    finally:
        conn.execute("COMMIT")
    return {"project": project, "items": n_items, "annotators": annotators, "settings": settings}, records
