"""The questionnaire server refuses strangers: real HTTP requests on 127.0.0.1 (issue 16, item 5).

A local page or program without a rater's link must not read or change answers; a link reads
and writes its own rater's answers only; malformed requests end with a 4xx and a message.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from test_study import write_explained_run

from voxplain.config import StudyMakeConfig, StudyServeConfig
from voxplain.study.make import make_questionnaires
from voxplain.study.serve import MAX_BODY_BYTES, QuestionnaireServer, issue_links

CRITERIA = ["quality", "plausibility"]
TIMEOUT = 0.5  # request_timeout of the served questionnaire, in seconds


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    run = write_explained_run(tmp_path_factory.mktemp("run"), per_class=2, wrong=1,
                              methods=["m1", "m2"])
    make_questionnaires(StudyMakeConfig(run=run, samples_per_class=2, pixels=32,
                                        criteria=CRITERIA))
    return run / "study"


def _started(study: Path, database: Path) -> QuestionnaireServer:
    server = QuestionnaireServer(StudyServeConfig(study=study, variant="A", port=0,
                                                  database=database, request_timeout=TIMEOUT))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def served(study, tmp_path):
    """The server, its database, and the tokens of raters alice and bob."""
    server = _started(study, tmp_path / "answers.sqlite")
    links = issue_links(server, ["alice", "bob"])
    yield server, tmp_path / "answers.sqlite", {r: _token(link) for r, link in links.items()}
    server.shutdown()
    server.server_close()


def _token(link: str) -> str:
    return link.split("?token=", 1)[1]


def _request(server: QuestionnaireServer, method: str, path: str, body: object = None,
             headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; a JSON-able ``body`` is sent as application/json."""
    connection = http.client.HTTPConnection(*server.server_address, timeout=5)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, path, body=data, headers={**sent, **(headers or {})})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def _raw(server: QuestionnaireServer, data: bytes) -> bytes:
    """Everything the server sends back on a socket that sent ``data`` and nothing more."""
    with socket.create_connection(server.server_address, timeout=5) as connection:
        connection.sendall(data)
        reply = b""
        while chunk := connection.recv(4096):
            reply += chunk
    return reply


def _answer(server: QuestionnaireServer, image: int = 0, criterion: str = CRITERIA[0],
            score: int = 1) -> dict:
    question = server.questionnaire["variants"]["A"][0]
    return {"question": question["question"], "image": question["images"][image],
            "criterion": criterion, "score": score}


def _stored(database: Path) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT rater, variant, image, criterion, score FROM answers ORDER BY rowid").fetchall()


@pytest.mark.parametrize("token", ["", "?token=", "?token=not-a-token"])
@pytest.mark.parametrize("method, route", [("GET", "/"), ("GET", "/answers"),
                                           ("GET", "/images/IMAGE.png"), ("POST", "/answer")])
def test_every_route_refuses_a_request_without_a_rater_token(served, method, route, token):
    server, database, _ = served
    route = route.replace("IMAGE", server.questionnaire["variants"]["A"][0]["images"][0])
    status, message = _request(server, method, route + token,
                               _answer(server) if method == "POST" else None)
    assert status == 403 and b"token" in message
    assert _stored(database) == []


def test_a_token_reaches_its_own_raters_answers_and_nothing_else(served):
    server, database, tokens = served
    assert _request(server, "POST", f"/answer?token={tokens['alice']}", _answer(server))[0] == 200
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}",
                               {**_answer(server, image=1), "rater": "bob"})
    assert status == 400 and b"rater" in message
    status, mine = _request(server, "GET", f"/answers?token={tokens['alice']}&rater=bob")
    assert status == 200 and [a["rater"] for a in json.loads(mine)] == ["alice"]
    status, bobs = _request(server, "GET", f"/answers?rater=alice&token={tokens['bob']}")
    assert status == 200 and json.loads(bobs) == []
    assert [row[0] for row in _stored(database)] == ["alice"]
    assert _request(server, "GET", f"/key.tsv?token={tokens['alice']}")[0] == 404
    assert _request(server, "GET", f"/images/../../key.tsv?token={tokens['alice']}")[0] == 404


def test_the_page_names_its_rater_and_escapes_the_name(served):
    server, _, _ = served
    link = issue_links(server, ['<img src=x onerror="alert(1)">'])
    status, page = _request(server, "GET", "/?token=" + _token(*link.values()))
    assert status == 200
    assert b"&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert b"<img src=x" not in page and b"onerror=\"" not in page


def test_a_post_from_another_origin_is_refused(served):
    server, database, tokens = served
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}",
                               _answer(server), headers={"Origin": "http://evil.example"})
    assert status == 403 and b"Origin" in message
    assert _stored(database) == []
    same_origin = {"Origin": f"http://127.0.0.1:{server.server_port}"}
    assert _request(server, "POST", f"/answer?token={tokens['alice']}", _answer(server),
                    headers=same_origin)[0] == 200


def test_a_post_that_is_not_json_is_refused(served):
    server, database, tokens = served
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}",
                               json.dumps(_answer(server)).encode(),
                               headers={"Content-Type": "text/plain"})
    assert status == 415 and b"application/json" in message
    assert _stored(database) == []


def test_a_request_for_another_host_is_refused_against_dns_rebinding(served):
    server, _, tokens = served
    port = server.server_port
    status, message = _request(server, "GET", f"/answers?token={tokens['alice']}",
                               headers={"Host": f"evil.example:{port}"})
    assert status == 403 and b"Host" in message
    assert _request(server, "GET", f"/answers?token={tokens['alice']}",
                    headers={"Host": f"localhost:{port}"})[0] == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    server, _, tokens = served
    reply = _raw(server, (f"POST /answer?token={tokens['alice']} HTTP/1.1\r\n"
                          f"Host: 127.0.0.1:{server.server_port}\r\n"
                          "Content-Type: application/json\r\n"
                          f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.0 413 ")
    assert str(MAX_BODY_BYTES).encode() in reply


def test_a_post_without_content_length_is_refused(served):
    server, _, tokens = served
    reply = _raw(server, (f"POST /answer?token={tokens['alice']} HTTP/1.1\r\n"
                          f"Host: 127.0.0.1:{server.server_port}\r\n"
                          "Content-Type: application/json\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.0 411 ")


def test_a_body_shorter_than_its_content_length_ends_with_408_within_the_timeout(served):
    server, database, tokens = served
    start = time.monotonic()
    reply = _raw(server, (f"POST /answer?token={tokens['alice']} HTTP/1.1\r\n"
                          f"Host: 127.0.0.1:{server.server_port}\r\n"
                          "Content-Type: application/json\r\n"
                          "Content-Length: 100\r\n\r\n" + "0123456789").encode())
    assert reply.startswith(b"HTTP/1.0 408 ")
    assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 3
    assert _stored(database) == []


@pytest.mark.parametrize("change, field", [
    ({"rater": 5}, b"rater"),
    ({"variant": "B"}, b"variant"),
    ({"score": "Infinity"}, b"score"),
    ({"score": 1e400}, b"score"),  # json.dumps writes Infinity
    ({"score": 5}, b"score"),
    ({"score": -5}, b"score"),
    ({"score": 2.5}, b"score"),
    ({"score": True}, b"score"),
    ({"score": None}, b"score"),
    ({"question": "0000000000000000"}, b"question"),
    ({"question": ["a list"]}, b"question"),
    ({"image": "0000000000000000"}, b"image"),
    ({"image": {"an": "object"}}, b"image"),
    ({"criterion": "beauty"}, b"criterion"),
    ({"criterion": 3}, b"criterion"),
])
def test_an_answer_that_does_not_fit_the_questionnaire_is_refused_naming_the_field(
        served, change, field):
    server, database, tokens = served
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}",
                               {**_answer(server), **change})
    assert status == 400 and field in message
    assert _stored(database) == []


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"NaN", b"Infinity", b"4.0000001"])
def test_a_score_that_is_no_finite_integer_is_refused_naming_it(served, literal):
    server, database, tokens = served
    body = json.dumps({**_answer(server), "score": 0}).encode().replace(
        b'"score": 0', b'"score": ' + literal)
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}", body)
    assert status == 400 and b"score" in message
    assert _stored(database) == []


@pytest.mark.parametrize("body, words", [
    (b'{"question": ', b"not JSON"),
    (b"\xff\xfe", b"not JSON"),
    (b"[" * 5000 + b"]" * 5000, b"not JSON"),
    (b"[1, 2]", b"JSON object"),
])
def test_a_body_that_is_no_answer_object_is_refused_with_a_message(served, body, words):
    server, database, tokens = served
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}", body)
    assert status == 400 and words in message
    assert _stored(database) == []


def test_a_missing_field_is_refused_naming_it(served):
    server, database, tokens = served
    answer = _answer(server)
    del answer["score"]
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}", answer)
    assert status == 400 and b"score" in message and b"missing" in message


def test_a_good_answer_lands_in_sqlite_and_comes_back_for_its_rater_only(served):
    server, database, tokens = served
    for rater, score in [("alice", 3), ("alice", -2), ("bob", 4)]:
        status, reply = _request(server, "POST", f"/answer?token={tokens[rater]}",
                                 _answer(server, score=score))
        assert (status, json.loads(reply)) == (200, {"saved": True})
    image = _answer(server)["image"]
    assert _stored(database) == [("alice", "A", image, CRITERIA[0], -2),
                                 ("bob", "A", image, CRITERIA[0], 4)]
    status, reply = _request(server, "GET", f"/answers?token={tokens['alice']}")
    assert status == 200
    assert json.loads(reply) == [{**_answer(server, score=-2), "rater": "alice", "variant": "A"}]


def test_a_failing_handler_answers_500_with_a_message_not_an_empty_reply(served, monkeypatch,
                                                                       caplog):
    server, _, tokens = served

    def broken(rows):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(server.answers, "record", broken)
    status, message = _request(server, "POST", f"/answer?token={tokens['alice']}",
                               _answer(server))
    assert status == 500 and b"log" in message
    assert "disk I/O error" in caplog.text
    assert tokens["alice"] not in caplog.text


def test_links_survive_a_restart_and_new_links_replace_old_ones(study, tmp_path):
    database = tmp_path / "answers.sqlite"
    first = _started(study, database)
    old = _token(issue_links(first, ["alice"])["alice"])
    first.shutdown()
    first.server_close()
    second = _started(study, database)
    try:
        assert issue_links(second, ["alice"]) == {}  # she keeps her link
        assert _request(second, "GET", f"/?token={old}")[0] == 200
        new = _token(issue_links(second, ["alice"], renew=True)["alice"])
        assert _request(second, "GET", f"/?token={old}")[0] == 403
        assert _request(second, "GET", f"/?token={new}")[0] == 200
    finally:
        second.shutdown()
        second.server_close()


def test_the_database_keeps_only_a_hash_of_each_token(served):
    server, database, tokens = served
    stored = database.read_bytes()
    assert tokens["alice"].encode() not in stored
    with sqlite3.connect(database) as connection:
        hashes = dict(connection.execute("SELECT rater, token_sha256 FROM rater_tokens"))
    assert hashes["alice"] == hashlib.sha256(tokens["alice"].encode()).hexdigest()


def test_rater_names_must_be_distinct_and_not_empty(study):
    with pytest.raises(ValueError, match="rater names"):
        StudyServeConfig(study=study, raters=["alice", " "])
    with pytest.raises(ValueError, match="rater names"):
        StudyServeConfig(study=study, raters=["alice", "alice "])
