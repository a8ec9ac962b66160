"""One questionnaire as a local web form; every answer goes to SQLite as the rater gives it.

The server (standard-library ``http.server``) listens on 127.0.0.1 only. The page posts each
score the moment it changes, so a closed browser loses nothing; reopening the page through the
same link shows the answers already given. The database holds one row per answer, unique on
(rater, question, image, criterion): a re-sent or changed answer updates its row (upsert).
Answers of studies run on paper enter the same table from a CSV (:meth:`AnswerStore.import_csv`).

Raters and their links: each rater gets a secret link ``http://127.0.0.1:PORT/?token=TOKEN``
(``secrets.token_urlsafe(16)``, printed once by :func:`serve` for the raters named in
``StudyServeConfig.raters``). The database keeps only the token's SHA-256 (table
``rater_tokens``), so links survive restarts and a copied database reveals none;
``new_links`` replaces a lost or leaked link. The rater of every request is the one of its
token, never a name the client sends.

Routes, each with ``?token=TOKEN``: ``GET /`` the form, ``GET /images/ID.png``,
``GET /answers`` (JSON: the token's rater's answers), ``POST /answer`` (JSON object with
exactly question, image, criterion and score, ``Content-Type: application/json``).

Other local pages and programs are strangers: a request is refused with a short plain-text
message when its ``Host`` is not 127.0.0.1:PORT or localhost:PORT (403, DNS rebinding), its
token is missing or unknown (403), a POST comes from another ``Origin`` (403, CSRF) or is not
JSON (415), its body has no Content-Length (411) or more than :data:`MAX_BODY_BYTES` (413),
does not arrive within ``request_timeout`` seconds (408), or an answer does not fit the
questionnaire (400, naming the field). Any other failure is logged with its traceback and
answered 500; no request ends with an empty reply.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import numbers
import re
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import ParseResult, parse_qs, urlparse

import pandas as pd

from voxplain.config import StudyServeConfig
from voxplain.io import atomic_path
from voxplain.study.make import StudyFolder

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
ANSWER_COLUMNS = ["rater", "variant", "question", "image", "criterion", "score"]
#: The fields of a posted answer; rater and variant come from the link and the server.
POSTED_FIELDS = ("question", "image", "criterion", "score")
#: Largest request body accepted (an answer is about 150 bytes).
MAX_BODY_BYTES = 64 * 1024
_IMAGE_NAME = re.compile(r"^/images/([0-9a-f]{16})\.png$")
_TOKEN_IN_TEXT = re.compile(r"token=[^&\s\"]*")
_TEXT = "text/plain; charset=utf-8"


class _SQLiteTable:
    """One table of the study's SQLite database, created on first use (``schema``)."""

    schema = ""

    def __init__(self, database: Path) -> None:
        self.database = Path(database)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection, connection:
            connection.execute(self.schema)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.database, timeout=30)


class AnswerStore(_SQLiteTable):
    """The SQLite table of answers: one row per (rater, question, image, criterion)."""

    schema = ("CREATE TABLE IF NOT EXISTS answers (rater TEXT NOT NULL, variant TEXT NOT NULL, "
              "question TEXT NOT NULL, image TEXT NOT NULL, criterion TEXT NOT NULL, "
              "score INTEGER NOT NULL, answered_at TEXT NOT NULL, "
              "UNIQUE (rater, question, image, criterion))")

    def record(self, rows: list[dict]) -> None:
        """Insert answers, or update the score of answers given before (one transaction)."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with closing(self._connect()) as connection, connection:
            connection.executemany(
                "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rater, question, image, criterion) DO UPDATE SET "
                "score = excluded.score, variant = excluded.variant, "
                "answered_at = excluded.answered_at",
                [(*(row[c] for c in ANSWER_COLUMNS), now) for row in rows])

    def answers(self, rater: str | None = None) -> pd.DataFrame:
        """All answers (or one rater's) in the order they were first given."""
        query = f"SELECT {', '.join(ANSWER_COLUMNS)} FROM answers"
        with closing(self._connect()) as connection:
            if rater is None:
                return pd.read_sql_query(query + " ORDER BY rowid", connection)
            return pd.read_sql_query(query + " WHERE rater = ? ORDER BY rowid", connection,
                                     params=(rater,))

    def export_csv(self, path: Path) -> None:
        """Write every answer to a CSV (the columns of :data:`ANSWER_COLUMNS`)."""
        with atomic_path(path) as temporary:
            self.answers().to_csv(temporary, index=False)

    def import_csv(self, path: Path, questionnaire: dict) -> int:
        """Add the answers of a CSV (e.g. typed in from paper), checked against the
        questionnaire; returns the number of rows."""
        frame = pd.read_csv(path, dtype={"rater": str, "question": str, "image": str})
        missing = set(ANSWER_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; need {ANSWER_COLUMNS}")
        rows = frame[ANSWER_COLUMNS].to_dict("records")
        for number, row in enumerate(rows, start=2):
            problem = answer_problem(row, questionnaire)
            if problem:
                raise ValueError(f"{path}, line {number}: {problem}")
        self.record(rows)
        return len(rows)


class RaterTokens(_SQLiteTable):
    """The raters' secret link tokens; the database keeps only each token's SHA-256."""

    schema = ("CREATE TABLE IF NOT EXISTS rater_tokens (rater TEXT PRIMARY KEY, "
              "token_sha256 TEXT NOT NULL UNIQUE, issued_at TEXT NOT NULL)")

    def issue(self, rater: str) -> str:
        """A new token of ``rater``; the rater's previous token stops working."""
        if not rater.strip():
            raise ValueError(f"a rater needs a name, got {rater!r}")
        token = secrets.token_urlsafe(16)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT INTO rater_tokens VALUES (?, ?, ?) ON CONFLICT (rater) DO UPDATE SET "
                "token_sha256 = excluded.token_sha256, issued_at = excluded.issued_at",
                (rater.strip(), _sha256(token), now))
        return token

    def raters(self) -> set[str]:
        """The raters who have a token."""
        with closing(self._connect()) as connection:
            return {rater for (rater,) in connection.execute("SELECT rater FROM rater_tokens")}

    def rater(self, token: str) -> str | None:
        """The rater of ``token``, or None when no rater has it."""
        with closing(self._connect()) as connection:
            found = connection.execute("SELECT rater FROM rater_tokens WHERE token_sha256 = ?",
                                       (_sha256(token),)).fetchone()
        return None if found is None else found[0]


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def answer_problem(row: dict, questionnaire: dict) -> str | None:
    """Why an answer does not fit the questionnaire, or None when it does."""
    for field in ("rater", "variant", "question", "image", "criterion"):
        if not isinstance(row.get(field), str):
            return f"{field} {row.get(field)!r} is not a string"
    if row["variant"] not in questionnaire["variants"]:
        return f"unknown variant {row['variant']!r}"
    if not row["rater"].strip():
        return "empty rater name"
    questions = {q["question"]: q["images"] for q in questionnaire["variants"][row["variant"]]}
    if row["question"] not in questions:
        return f"unknown question {row['question']!r}"
    if row["image"] not in questions[row["question"]]:
        return f"image {row['image']!r} is not part of question {row['question']}"
    if row["criterion"] not in [c["name"] for c in questionnaire["criteria"]]:
        return f"unknown criterion {row['criterion']!r}"
    score, low, high = row.get("score"), questionnaire["score_min"], questionnaire["score_max"]
    if (isinstance(score, bool) or not isinstance(score, numbers.Real)
            or not math.isfinite(score) or score != int(score) or not low <= score <= high):
        return f"score {score!r} is not an integer from {low} to {high}"
    return None


def posted_answer(body: bytes, questionnaire: dict, variant: str, rater: str) -> dict:
    """The answer row of a posted JSON body (rater and variant from the server, not the
    client); ValueError naming the field when it does not fit the questionnaire."""
    try:
        posted = json.loads(body)  # NaN and Infinity parse, and fail as a score below
    except (ValueError, RecursionError) as error:
        raise ValueError(f"the body is not JSON ({error})") from None
    if not isinstance(posted, dict):
        raise ValueError(f"the body must be a JSON object with {', '.join(POSTED_FIELDS)}")
    unknown, missing = set(posted) - set(POSTED_FIELDS), set(POSTED_FIELDS) - set(posted)
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))}: not part of an answer "
                         f"({', '.join(POSTED_FIELDS)}); the rater comes from the link")
    if missing:
        raise ValueError(f"{', '.join(sorted(missing))}: missing from the answer")
    row = {**posted, "rater": rater, "variant": variant}
    problem = answer_problem(row, questionnaire)
    if problem:
        raise ValueError(problem)
    return {**row, "score": int(row["score"])}


def questionnaire_page(questionnaire: dict, variant: str, rater: str) -> str:
    """The HTML form of one variant for one rater: image ids and criteria only, never a method
    name; the page's script adds the link's token to every request it makes."""
    criteria = questionnaire["criteria"]
    scores = range(questionnaire["score_min"], questionnaire["score_max"] + 1)
    options = '<option value="">–</option>' + "".join(
        f'<option value="{s}">{s}</option>' for s in scores)
    blocks = []
    for number, question in enumerate(questionnaire["variants"][variant], start=1):
        cells = []
        for letter, image in zip("abcdefghijklmnopqrstuvwxyz", question["images"]):
            selects = "".join(
                f'<label>{html.escape(c["name"])} <select '
                f'data-question="{html.escape(question["question"])}" '
                f'data-image="{html.escape(image)}" data-criterion="{html.escape(c["name"])}">'
                f'{options}</select></label>' for c in criteria)
            cells.append(f'<figure><img data-src="images/{html.escape(image)}.png" '
                         f'alt="image {letter}"><figcaption>image {letter}{selects}'
                         f'</figcaption></figure>')
        blocks.append(
            f'<section><h2>Question {number}</h2><figure><img data-src="images/'
            f'{html.escape(question["original"])}.png" alt="original image"><figcaption>original'
            f'</figcaption></figure>{"".join(cells)}</section>')
    legend = "".join(f"<li><b>{html.escape(c['name'])}</b> {html.escape(c['prompt'])}</li>"
                     for c in criteria)
    return _PAGE.format(variant=html.escape(variant), rater=html.escape(rater), legend=legend,
                        low=questionnaire["score_min"], high=questionnaire["score_max"],
                        questions="".join(blocks))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Questionnaire {variant}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} section {{ border-top: 1px solid #888; }}
figure {{ display: inline-block; margin: .5em; vertical-align: top; }}
figcaption label {{ display: block; }} select.saved {{ background: #d8f0d8; }}
select.failed {{ background: #f0d0d0; }}
</style></head><body>
<h1>Questionnaire {variant}</h1>
<p>Answers of <b id="rater">{rater}</b>.</p>
<p>Score every image from {low} (low) to {high} (high) on each criterion. Each answer is saved
as soon as you choose it; you may close this page and come back through the same link.</p>
<ul>{legend}</ul>
<div id="questions">{questions}</div>
<p id="progress"></p>
<script>
const token = new URLSearchParams(location.search).get("token") || "";
const withToken = path => path + "?token=" + encodeURIComponent(token);
document.querySelectorAll("img[data-src]").forEach(i => {{ i.src = withToken(i.dataset.src); }});
const selects = Array.from(document.querySelectorAll("select[data-image]"));
function progress(text) {{
  const done = selects.filter(s => s.classList.contains("saved")).length;
  document.getElementById("progress").textContent =
    text || done + " of " + selects.length + " saved";
}}
async function save(select) {{
  select.classList.remove("saved", "failed");
  const body = {{question: select.dataset.question, image: select.dataset.image,
                criterion: select.dataset.criterion, score: Number(select.value)}};
  try {{
    const reply = await fetch(withToken("answer"), {{method: "POST", body: JSON.stringify(body),
                                         headers: {{"Content-Type": "application/json"}}}});
    select.classList.add(reply.ok ? "saved" : "failed");
    progress(reply.ok ? "" : "not saved: " + await reply.text());
  }} catch (error) {{ select.classList.add("failed"); progress("not saved: " + error); }}
}}
selects.forEach(s => s.addEventListener("change", () => {{ if (s.value !== "") save(s); }}));
async function restore() {{
  const reply = await fetch(withToken("answers"));
  if (!reply.ok) {{ progress("answers not loaded: " + await reply.text()); return; }}
  for (const a of await reply.json()) {{
    const s = selects.find(s => s.dataset.question === a.question &&
                                s.dataset.image === a.image && s.dataset.criterion === a.criterion);
    if (s) {{ s.value = String(a.score); s.classList.add("saved"); }}
  }}
  progress();
  document.body.dataset.ready = "true";
}}
restore();
</script></body></html>
"""


class RequestRefused(Exception):
    """A request answered with a 4xx status and a plain-text message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class QuestionnaireServer(ThreadingHTTPServer):
    """One questionnaire variant on 127.0.0.1 (not started: call ``serve_forever``);
    ``url`` is its address, useful with ``port=0``."""

    daemon_threads = True

    def __init__(self, config: StudyServeConfig) -> None:
        self.folder = StudyFolder(Path(config.study))
        self.questionnaire = self.folder.questionnaire()
        if config.variant not in self.questionnaire["variants"]:
            raise ValueError(f"{self.folder.questionnaire_file}: no variant {config.variant!r}")
        self.variant = config.variant
        self.answers = AnswerStore(config.database or self.folder.database)
        self.tokens = RaterTokens(config.database or self.folder.database)
        self.request_timeout = config.request_timeout
        super().__init__((HOST, config.port), QuestionnaireHandler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_port}/"

    @property
    def hosts(self) -> set[str]:
        """The ``Host`` headers of requests meant for this server."""
        names = {HOST, "localhost"}
        return {f"{name}:{self.server_port}" for name in names} | (
            names if self.server_port == 80 else set())


class QuestionnaireHandler(BaseHTTPRequestHandler):
    """The routes of :class:`QuestionnaireServer` (see the module docstring)."""

    server: QuestionnaireServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # read by StreamRequestHandler.setup
        super().setup()

    def do_GET(self) -> None:
        self._respond(self._get)

    def do_POST(self) -> None:
        self._respond(self._post)

    def _respond(self, route: Callable[[ParseResult], tuple[HTTPStatus, str, bytes]]) -> None:
        try:
            status, kind, body = route(urlparse(self.path))
        except RequestRefused as refusal:
            self.close_connection = True  # an unread body must not be taken for a request
            status, kind, body = refusal.status, _TEXT, refusal.message.encode()
        except Exception:
            log.exception("%s %s failed", self.command, _redacted(self.path))
            self.close_connection = True
            status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, _TEXT
            body = b"internal error of the questionnaire server; its log has the details"
        self._reply(status, kind, body)

    def _get(self, url: ParseResult) -> tuple[HTTPStatus, str, bytes]:
        self._checked_host()
        rater = self._rater(url)
        server = self.server
        if url.path in ("/", "/index.html"):
            page = questionnaire_page(server.questionnaire, server.variant, rater)
            return HTTPStatus.OK, "text/html; charset=utf-8", page.encode()
        if url.path == "/answers":
            rows = server.answers.answers(rater)
            rows = rows[rows["variant"] == server.variant]
            return HTTPStatus.OK, "application/json", rows.to_json(orient="records").encode()
        if (match := _IMAGE_NAME.match(url.path)) and (
                path := server.folder.image_dir / f"{match.group(1)}.png").is_file():
            return HTTPStatus.OK, "image/png", path.read_bytes()
        raise RequestRefused(HTTPStatus.NOT_FOUND, f"not found: {url.path}")

    def _post(self, url: ParseResult) -> tuple[HTTPStatus, str, bytes]:
        body = self._body()  # read first: a refusal reaches a client still sending
        host = self._checked_host()
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host}":
            raise RequestRefused(HTTPStatus.FORBIDDEN,
                                 f"Origin {origin!r}: only this server's own page may post")
        rater = self._rater(url)
        if url.path != "/answer":
            raise RequestRefused(HTTPStatus.NOT_FOUND, f"not found: {url.path}")
        if self.headers.get_content_type() != "application/json":
            raise RequestRefused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                 f"Content-Type {self.headers.get('Content-Type')!r}: "
                                 "an answer is sent as application/json")
        try:
            row = posted_answer(body, self.server.questionnaire, self.server.variant, rater)
        except ValueError as error:
            raise RequestRefused(HTTPStatus.BAD_REQUEST, str(error)) from None
        self.server.answers.record([row])
        return HTTPStatus.OK, "application/json", b'{"saved": true}'

    def _checked_host(self) -> str:
        host = (self.headers.get("Host") or "").lower()
        if host not in self.server.hosts:
            raise RequestRefused(HTTPStatus.FORBIDDEN,
                                 f"Host {host!r}: this server answers {self.server.url} only")
        return host

    def _rater(self, url: ParseResult) -> str:
        token = parse_qs(url.query).get("token", [""])[0]
        rater = self.server.tokens.rater(token) if token else None
        if rater is None:
            raise RequestRefused(HTTPStatus.FORBIDDEN,
                                 "missing or unknown token: open the questionnaire through "
                                 "your own link (http://127.0.0.1:PORT/?token=...)")
        return rater

    def _body(self) -> bytes:
        """The request body: at most MAX_BODY_BYTES, within the connection's timeout."""
        lengths = self.headers.get_all("Content-Length") or []
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower() or not lengths:
            raise RequestRefused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,20}", lengths[0].strip()):
            raise RequestRefused(HTTPStatus.BAD_REQUEST,
                                 f"Content-Length {', '.join(lengths)!r} is not one byte count")
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            raise RequestRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"body of {length} bytes; at most {MAX_BODY_BYTES} accepted")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestRefused(HTTPStatus.REQUEST_TIMEOUT,
                                 f"the body of {length} bytes did not arrive within "
                                 f"{self.server.request_timeout:g} s") from None
        if len(body) != length:
            raise RequestRefused(HTTPStatus.BAD_REQUEST,
                                 f"the body ended after {len(body)} of {length} bytes")
        return body

    def _reply(self, status: HTTPStatus, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), _redacted(format % args))


def _redacted(text: str) -> str:
    """``text`` without the tokens it may contain (request lines end up in logs)."""
    return _TOKEN_IN_TEXT.sub("token=…", text)


def issue_links(server: QuestionnaireServer, raters: list[str],
                renew: bool = False) -> dict[str, str]:
    """Links of the named raters who have none (with ``renew``: of all of them, replacing
    their old ones), as {rater: URL}; the other raters' links keep working."""
    have = server.tokens.raters()
    return {rater: f"{server.url}?token={server.tokens.issue(rater)}"
            for rater in raters if renew or rater not in have}


def serve(config: StudyServeConfig) -> None:
    """Print the new rater links (one ``RATER<tab>URL`` line each) on stdout, then serve
    until interrupted (Ctrl-C)."""
    server = QuestionnaireServer(config)
    kept = [] if config.new_links else sorted(set(config.raters) & server.tokens.raters())
    for rater, link in issue_links(server, config.raters, config.new_links).items():
        print(f"{rater}\t{link}", flush=True)
    for rater in kept:
        log.info("%s keeps the link given before (--new-links gives a new one)", rater)
    if not server.tokens.raters():
        log.warning("no rater has a link yet: restart with --rater NAME")
    log.info("questionnaire %s on %s (answers in %s); Ctrl-C stops", config.variant,
             server.url, server.answers.database)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
