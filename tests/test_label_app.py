"""The annotation app through its HTTP interface (in process): login, the page, the JSON API, escaping of
untrusted text, one project per token, and export of what was answered."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest

pytest.importorskip("fastapi", reason="the label extra (pip install 'forgeline[label]') is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from forgeline.cli import main  # noqa: E402
from forgeline.errors import ForgelineError  # noqa: E402
from forgeline.label import store  # noqa: E402
from forgeline.label.app import COOKIE, create_app  # noqa: E402

XSS = "<script>alert(1)</script>"
RAW_HTML = '</pre><img src=x onerror="alert(2)"><b>bold</b> & "quotes"'
BIG = ("line of a long answer <i>x</i>\n" * 7000)[:200_000]


def _items(prefix: str, n: int, k: int = 2) -> list[store.NewItem]:
    return [store.NewItem(prompt=f"{prefix} prompt {i}",
                          responses=tuple((f"m{s}", f"{prefix} item {i} from m{s}") for s in range(k)))
            for i in range(n)]


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "labels.db"
    conn = store.open_database(path, create=True)
    hostile = [
        store.NewItem(prompt=[{"role": "system", "content": "<b>sys</b>"}, {"role": XSS, "content": RAW_HTML}],
                      responses=(("m0", XSS), ("m1", RAW_HTML))),
        store.NewItem(prompt="long one", responses=(("m0", BIG), ("m1", "short"))),
        store.NewItem(prompt="rank these", responses=(("m0", "zero"), ("m1", "one"), ("m2", "two"))),
    ]
    tokens = store.create_project(conn, "one", hostile + _items("one", 2), {}, ["alice", "bob"])
    tokens |= {f"two:{k}": v for k, v in store.create_project(conn, "two", _items("two", 3), {}, ["alice"]).items()}
    conn.close()
    return path, tokens


def client(path, token=None) -> TestClient:
    c = TestClient(create_app(path))
    if token is not None:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


def test_login_page_cookie_and_logout(db):
    path, tokens = db
    c = client(path)
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert 'name="token"' in c.get("/login").text
    r = c.post("/login", data={"token": "not-a-token"}, follow_redirects=False)
    assert r.status_code == 401 and "not valid" in r.text and COOKIE not in r.headers.get("set-cookie", "")
    r = c.post("/login", data={"token": tokens["alice"]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = c.get("/")
    assert page.status_code == 200 and "0 / 5 labelled" in page.text and "alice" in page.text
    assert "m0" not in page.text and "m1" not in page.text  # model names stay hidden
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]
    assert c.get("/api/next").json()["annotator"] == "alice"
    assert c.post("/logout", follow_redirects=False).status_code == 303
    assert c.get("/api/next").status_code == 401
    # a form on another site can post text/plain but not JSON: the API takes JSON only
    r = client(path, tokens["alice"]).post("/api/answer", content='{"item": 1, "choice": "A"}',
                                           headers={"Content-Type": "text/plain"})
    assert r.status_code == 422
    assert c.get("/static/label.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/static/label.css").status_code == 200


def test_untrusted_text_is_escaped_and_the_page_still_works(db):
    path, tokens = db
    c = client(path, tokens["alice"])
    page = c.get("/").text
    assert XSS not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;/pre&gt;&lt;img src=x onerror=&#34;alert(2)&#34;&gt;&lt;b&gt;bold&lt;/b&gt; &amp; &#34;quotes&#34;" in page
    assert "&lt;b&gt;sys&lt;/b&gt;" in page and page.count('<script src="/static/label.js">') == 1
    state = c.get("/api/next").json()
    assert sorted(r["text"] for r in state["item"]["responses"]) == sorted([XSS, RAW_HTML])  # JSON: exact text
    assert state["item"]["prompt"][1] == {"role": XSS, "content": RAW_HTML}
    r = c.post("/api/answer", json={"item": state["item"]["id"], "choice": "tie", "comment": XSS})
    assert r.status_code == 200
    big_page = c.get("/").text
    assert big_page.count("line of a long answer &lt;i&gt;x&lt;/i&gt;") == BIG.count("line of a long answer")
    assert "<i>x</i>" not in big_page and len(big_page) > len(BIG)
    assert "1 / 5 labelled" in big_page and 'id="choose-A"' in big_page and "</html>" in big_page
    big = r.json()["item"]
    assert any(resp["text"] == BIG for resp in big["responses"])
    assert c.post("/api/answer", json={"item": big["id"], "choice": "A"}).status_code == 200
    assert c.get(f"/api/items/{state['item']['id']}").json()["answer"]["comment"] == XSS


def test_answers_map_display_labels_to_responses_and_are_final(db):
    path, tokens = db
    c = client(path, tokens["bob"])
    first = c.get("/api/next").json()
    item = first["item"]
    assert (first["done"], first["total"], item["mode"]) == (0, 5, "choice")
    r = c.post("/api/answer", json={"item": item["id"], "choice": "B", "comment": "B reads better"})
    assert r.status_code == 200
    body = r.json()
    assert body["saved"] == {"item": item["id"], "kind": "preferred"} and body["done"] == 1
    assert body["item"]["id"] != item["id"]  # the reply carries the next item
    assert c.post("/api/answer", json={"item": item["id"], "choice": "A"}).status_code == 409
    with sqlite3.connect(path) as conn:
        slots = json.loads(conn.execute("SELECT o.slots FROM orders o JOIN annotators a ON a.id = o.annotator_id "
                                        "WHERE a.name = 'bob' AND o.item_id = ?", (item["id"],)).fetchone()[0])
        ranking, comment = conn.execute("SELECT a.ranking, a.comment FROM answers a JOIN annotators n "
                                        "ON n.id = a.annotator_id WHERE n.name = 'bob'").fetchone()
    assert json.loads(ranking) == [slots[1], slots[0]] and comment == "B reads better"
    assert c.get(f"/api/items/{item['id']}").json()["answer"]["ranking"] == ["B", "A"]

    ranked = body["item"]
    assert c.post("/api/answer", json={"item": ranked["id"], "choice": "A"}).status_code == 200  # two responses
    three = c.get("/api/next").json()["item"]
    assert three["mode"] == "ranking" and len(three["responses"]) == 3
    for bad in ({"choice": "A"}, {"ranking": ["A", "B"]}, {"ranking": ["A", "A", "B"]}, {"ranking": ["A", "B", "D"]},
                {}, {"choice": "A", "ranking": ["A", "B", "C"]}, {"choice": "C"}, {"comment": "x" * 10_001}):
        r = c.post("/api/answer", json={"item": three["id"], **bad})
        assert r.status_code == 422, bad
    assert c.post("/api/answer", json={"item": three["id"], "ranking": ["C", "A", "B"]}).status_code == 200
    nxt = c.get("/api/next").json()["item"]
    assert c.post("/api/answer", json={"item": nxt["id"], "ranking": ["B", "A"]}).status_code == 200  # 2 ranked
    last = c.get("/api/next").json()["item"]
    assert c.post("/api/answer", json={"item": last["id"], "choice": "both_bad"}).json()["item"] is None
    assert c.get("/api/next").json() == {"project": "one", "annotator": "bob", "done": 5, "total": 5, "item": None}
    assert "All 5 items are labelled" in c.get("/").text


def test_a_token_reaches_only_its_own_project(db):
    path, tokens = db
    alice_one, alice_two = client(path, tokens["alice"]), client(path, tokens["two:alice"])
    with sqlite3.connect(path) as conn:
        two_items = [r[0] for r in conn.execute("SELECT i.id FROM items i JOIN projects p ON p.id = i.project_id "
                                                "WHERE p.name = 'two'")]
        one_items = [r[0] for r in conn.execute("SELECT i.id FROM items i JOIN projects p ON p.id = i.project_id "
                                                "WHERE p.name = 'one'")]
    assert alice_two.post("/api/answer", json={"item": two_items[0], "choice": "A"}).status_code == 200
    for item in two_items:
        assert alice_one.get(f"/api/items/{item}").status_code == 404
        assert alice_one.post("/api/answer", json={"item": item, "choice": "A"}).status_code == 404
    for item in one_items:
        assert alice_two.get(f"/api/items/{item}").status_code == 404
        assert alice_two.post("/api/answer", json={"item": item, "choice": "A"}).status_code == 404
    assert alice_one.get("/api/items/999999").status_code == 404
    seen = set()
    while (item := alice_one.get("/api/next").json()["item"]) is not None:
        seen.add(item["id"])
        answer = {"choice": "A"} if item["mode"] == "choice" else {"ranking": ["A", "B", "C"]}
        assert alice_one.post("/api/answer", json={"item": item["id"], **answer}).status_code == 200
    assert seen == set(one_items)
    assert client(path).get("/api/next").status_code == 401
    assert client(path, "forged-token").post("/api/answer", json={"item": one_items[0], "choice": "A"}
                                             ).status_code == 401
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1 + len(one_items)


def test_export_writes_pairs_and_the_report(db, tmp_path, capsys):
    path, tokens = db
    for who, choice in (("alice", "A"), ("bob", "B")):
        c = client(path, tokens[who])
        while (item := c.get("/api/next").json()["item"]) is not None:
            answer = {"choice": choice} if item["mode"] == "choice" else {"ranking": ["C", "B", "A"]}
            assert c.post("/api/answer", json={"item": item["id"], **answer}).status_code == 200
    out, report_path = tmp_path / "out" / "prefs.jsonl", tmp_path / "report.json"
    assert main(["label", "export", str(path), "--project", "one", "--out", str(out),
                 "--report", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "Krippendorff's alpha" in printed and "Cohen's kappa alice / bob" in printed
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == 2 * (4 + 3)  # each annotator: 4 two-response choices, one ranking of 3
    assert {p["annotator"] for p in pairs} == {"alice", "bob"}
    first = pairs[0]
    assert set(first) == {"prompt", "chosen", "rejected", "item", "annotator", "chosen_model", "rejected_model"}
    assert first["prompt"][1] == {"role": XSS, "content": RAW_HTML} and {first["chosen"], first["rejected"]} == {
        XSS, RAW_HTML}
    # preference training reads the file as it is (the extra keys ride along); the first item's made-up role
    # (the escaping test's) is no chat role, so its lines are the ones skipped
    from forgeline.data.preference import iter_preference_examples

    examples = list(iter_preference_examples(str(out), on_error="skip"))
    assert len(examples) == sum(p["item"] != first["item"] for p in pairs)
    report = json.loads(report_path.read_text())
    assert report["choices"] == {"preferred": 8, "ranked": 2, "tie": 0, "both_bad": 0}
    assert report["agreement"]["items_labelled_by_2_or_more"] == 5
    assert set(report["win_rates"]["models"]) == {"m0", "m1", "m2"}
    assert "half" in report["win_rates"]["ties"]
    assert not list(out.parent.glob(".*"))  # the atomic writer left no temp file
    assert main(["label", "export", str(path), "--project", "three", "--out", str(out)]) == 2
    assert "no project 'three' in this database (projects: one, two)" in capsys.readouterr().err


def test_without_the_label_extra(db, tmp_path, capsys, monkeypatch):
    path, _ = db
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert main(["label", "serve", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs FastAPI and uvicorn" in err and "pip install 'forgeline[label]'" in err
    with pytest.raises(ForgelineError):
        from forgeline.label.serve import require_web_extra

        require_web_extra()
    # everything but serving works without it
    assert main(["label", "add-annotator", str(path), "--project", "one", "--name", "carol"]) == 0
    assert main(["label", "export", str(path), "--project", "one", "--out", str(tmp_path / "p.jsonl")]) == 0


def test_serve_refuses_a_port_in_use_and_warns_off_localhost(db, capsys):
    import socket

    from forgeline.label.serve import is_loopback

    path, _ = db
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["label", "serve", str(path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
