"""`forgeline label serve` as a real server: an answer whose POST returned 200 survives a SIGKILL of the server,
and 20 annotators posting at once for a few seconds lose nothing and store nothing twice.

The helpers here (LabelServer, ApiClient) are also what the browser test drives its server with."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the label extra (pip install 'forgeline[label]') is not installed")
pytest.importorskip("uvicorn", reason="the label extra (pip install 'forgeline[label]') is not installed")

from forgeline.label import store  # noqa: E402

pytestmark = pytest.mark.slow


class LabelServer:
    """`forgeline label serve DB --port 0` as a child process; the port it picked is read from its first line."""

    def __init__(self, db: Path, log: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "forgeline", "label", "serve", str(db), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self.log, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            self.stop()
            raise AssertionError(f"the server did not start: {line!r}; its log: {log.read_text()[-2000:]}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown handler runs, nothing is flushed on the way out
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.stdout.close()
        self.log.close()

    def __enter__(self) -> "LabelServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ApiClient:
    """One annotator's keep-alive connection (http.client: light enough for 20 threads on 2 cores)."""

    def __init__(self, port: int, token: str, timeout: float = 60):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}

    def close(self) -> None:
        self.conn.close()


def make_db(path: Path, n_items: int, annotators: list[str]) -> dict[str, str]:
    items = [store.NewItem(prompt=f"prompt {i}", responses=(("m0", f"m0 on {i}"), ("m1", f"m1 on {i}")))
             for i in range(n_items)]
    conn = store.open_database(path, create=True)
    try:
        return store.create_project(conn, "durable", items, {}, annotators)
    finally:
        conn.close()


def stored_answers(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT n.name, a.item_id FROM answers a JOIN annotators n ON n.id = a.annotator_id"
                            ).fetchall()


def test_answers_acknowledged_before_a_sigkill_are_kept(tmp_path):
    db = tmp_path / "labels.db"
    tokens = make_db(db, 200, ["alice", "bob"])
    acknowledged: dict[str, list[int]] = {"alice": [], "bob": []}

    def annotate(name: str, port: int) -> None:
        client = ApiClient(port, tokens[name])
        try:
            status, state = client.call("GET", "/api/next")
            while status == 200 and state["item"] is not None:
                item = state["item"]["id"]
                status, state = client.call("POST", "/api/answer", {"item": item, "choice": random.choice("AB")})
                if status == 200:
                    acknowledged[name].append(item)
        except (OSError, http.client.HTTPException):
            pass  # the server was killed mid-request: that answer may or may not be stored
        finally:
            client.close()

    server = LabelServer(db, tmp_path / "server.log")
    try:
        threads = [threading.Thread(target=annotate, args=(name, server.port)) for name in tokens]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(map(len, acknowledged.values())) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # while both annotators are still posting
        for t in threads:
            t.join(timeout=60)
    finally:
        server.stop()
    assert sum(map(len, acknowledged.values())) >= 30

    with LabelServer(db, tmp_path / "server2.log") as again:
        stored = stored_answers(db)
        for name, items in acknowledged.items():
            mine = {item for who, item in stored if who == name}
            assert set(items) <= mine, f"{name}: acknowledged answers lost: {sorted(set(items) - mine)}"
            assert len(mine) - len(items) <= 1  # at most the one in flight when the server died
            client = ApiClient(again.port, tokens[name])
            status, state = client.call("GET", "/api/next")
            assert status == 200 and state["done"] == len(mine)
            assert state["item"]["id"] not in mine
            assert client.call("GET", f"/api/items/{items[-1]}")[1]["answer"]["kind"] == "preferred"
            assert client.call("POST", "/api/answer", {"item": state["item"]["id"], "choice": "tie"})[0] == 200
            client.close()


def test_twenty_annotators_at_once_lose_nothing(tmp_path):
    n_annotators, seconds = 20, 5.0
    db = tmp_path / "labels.db"
    names = [f"annotator{i:02d}" for i in range(n_annotators)]
    tokens = make_db(db, 600, names)
    acknowledged: dict[str, list[int]] = {name: [] for name in names}
    refused_repeats: dict[str, int] = {name: 0 for name in names}
    failures: list[str] = []
    start = threading.Barrier(n_annotators + 1)

    def annotate(name: str, port: int, deadline_box: list[float]) -> None:
        client = ApiClient(port, tokens[name])
        rng = random.Random(name)
        try:
            status, state = client.call("GET", "/api/next")
            start.wait()
            while time.monotonic() < deadline_box[0] and state.get("item") is not None:
                item = state["item"]["id"]
                answer = {"item": item, "choice": rng.choice(["A", "B", "tie", "both_bad"]), "comment": name}
                status, reply = client.call("POST", "/api/answer", answer)
                if status != 200:
                    failures.append(f"{name}: item {item}: {status} {reply}")
                    return
                acknowledged[name].append(item)
                state = reply
                if len(acknowledged[name]) % 7 == 0:  # the same answer again must not be stored twice
                    status, _ = client.call("POST", "/api/answer", answer)
                    if status != 409:
                        failures.append(f"{name}: repeated item {item} answered {status}, not 409")
                    refused_repeats[name] += 1
        except Exception as exc:  # noqa: BLE001 (reported below, with the annotator)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            client.close()

    with LabelServer(db, tmp_path / "server.log") as server:
        deadline = [float("inf")]
        threads = [threading.Thread(target=annotate, args=(name, server.port, deadline)) for name in names]
        for t in threads:
            t.start()
        start.wait(timeout=60)
        deadline[0] = time.monotonic() + seconds
        for t in threads:
            t.join(timeout=seconds + 120)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
        stored = stored_answers(db)
    total = sum(map(len, acknowledged.values()))
    assert total >= n_annotators  # every annotator got answers through
    assert len(stored) == total and len(set(stored)) == len(stored)
    for name in names:
        assert sorted(item for who, item in stored if who == name) == sorted(acknowledged[name])
    assert sum(refused_repeats.values()) >= 1
