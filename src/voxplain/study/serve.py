"""One questionnaire as a local web form; every answer goes to SQLite as the rater gives it.

The server (standard-library ``http.server``) listens on 127.0.0.1 only. The page posts each
score the moment it changes, so a closed browser loses nothing; reopening the page with the same
rater name shows the answers already given. The database holds one row per answer, unique on
(rater, question, image, criterion): a re-sent or changed answer updates its row (upsert).
Answers of studies run on paper enter the same table from a CSV (:meth:`AnswerStore.import_csv`).

Routes: ``GET /?rater=NAME`` the form, ``GET /images/ID.png``, ``GET /answers?rater=NAME``
(JSON), ``POST /answer`` (JSON: rater, question, image, criterion, score).
"""

from __future__ import annotations

import html
import json
import logging
import re
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pandas as pd

from voxplain.config import StudyServeConfig
from voxplain.io import atomic_path
from voxplain.study.make import StudyFolder

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
ANSWER_COLUMNS = ["rater", "variant", "question", "image", "criterion", "score"]
_IMAGE_NAME = re.compile(r"^/images/([0-9a-f]{16})\.png$")


class AnswerStore:
    """The SQLite table of answers: one row per (rater, question, image, criterion)."""

    def __init__(self, database: Path) -> None:
        self.database = Path(database)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS answers (rater TEXT NOT NULL, variant TEXT NOT NULL, "
                "question TEXT NOT NULL, image TEXT NOT NULL, criterion TEXT NOT NULL, "
                "score INTEGER NOT NULL, answered_at TEXT NOT NULL, "
                "UNIQUE (rater, question, image, criterion))")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.database, timeout=30)

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


def answer_problem(row: dict, questionnaire: dict) -> str | None:
    """Why an answer does not fit the questionnaire, or None when it does."""
    variant = str(row.get("variant"))
    if variant not in questionnaire["variants"]:
        return f"unknown variant {variant!r}"
    if not str(row.get("rater") or "").strip():
        return "empty rater name"
    questions = {q["question"]: q["images"] for q in questionnaire["variants"][variant]}
    if row.get("question") not in questions:
        return f"unknown question {row.get('question')!r}"
    if row.get("image") not in questions[row["question"]]:
        return f"image {row.get('image')!r} is not part of question {row['question']}"
    if row.get("criterion") not in [c["name"] for c in questionnaire["criteria"]]:
        return f"unknown criterion {row.get('criterion')!r}"
    try:
        score = int(row["score"])
    except (TypeError, ValueError):
        return f"score {row.get('score')!r} is not an integer"
    if score != float(row["score"]) or not (
            questionnaire["score_min"] <= score <= questionnaire["score_max"]):
        return (f"score {row['score']!r} is not an integer from {questionnaire['score_min']} "
                f"to {questionnaire['score_max']}")
    return None


def questionnaire_page(questionnaire: dict, variant: str) -> str:
    """The HTML form of one variant: image ids and criteria only, never a method name."""
    criteria = questionnaire["criteria"]
    scores = range(questionnaire["score_min"], questionnaire["score_max"] + 1)
    options = '<option value="">–</option>' + "".join(
        f'<option value="{s}">{s}</option>' for s in scores)
    blocks = []
    for number, question in enumerate(questionnaire["variants"][variant], start=1):
        cells = []
        for letter, image in zip("abcdefghijklmnopqrstuvwxyz", question["images"]):
            selects = "".join(
                f'<label>{html.escape(c["name"])} <select data-question="{question["question"]}" '
                f'data-image="{image}" data-criterion="{html.escape(c["name"])}">{options}'
                f'</select></label>' for c in criteria)
            cells.append(f'<figure><img src="images/{image}.png" alt="image {letter}">'
                         f'<figcaption>image {letter}{selects}</figcaption></figure>')
        blocks.append(
            f'<section><h2>Question {number}</h2><figure><img src="images/'
            f'{question["original"]}.png" alt="original image"><figcaption>original'
            f'</figcaption></figure>{"".join(cells)}</section>')
    legend = "".join(f"<li><b>{html.escape(c['name'])}</b> {html.escape(c['prompt'])}</li>"
                     for c in criteria)
    return _PAGE.format(variant=variant, legend=legend, low=questionnaire["score_min"],
                        high=questionnaire["score_max"], questions="".join(blocks))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Questionnaire {variant}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} section {{ border-top: 1px solid #888; }}
figure {{ display: inline-block; margin: .5em; vertical-align: top; }}
figcaption label {{ display: block; }} select.saved {{ background: #d8f0d8; }}
select.failed {{ background: #f0d0d0; }}
</style></head><body>
<h1>Questionnaire {variant}</h1>
<form id="who" method="get"><label>Your name <input id="rater" name="rater"></label>
<button type="submit">Start</button></form>
<p>Score every image from {low} (low) to {high} (high) on each criterion. Each answer is saved
as soon as you choose it; you may close this page and come back with the same name.</p>
<ul>{legend}</ul>
<div id="questions">{questions}</div>
<p id="progress"></p>
<script>
const variant = "{variant}";
const rater = new URLSearchParams(location.search).get("rater") || "";
document.getElementById("rater").value = rater;
const selects = Array.from(document.querySelectorAll("select[data-image]"));
document.getElementById("questions").hidden = !rater;
function progress() {{
  const done = selects.filter(s => s.classList.contains("saved")).length;
  document.getElementById("progress").textContent = done + " of " + selects.length + " saved";
}}
async function save(select) {{
  select.classList.remove("saved", "failed");
  const body = {{rater: rater, variant: variant, question: select.dataset.question,
                image: select.dataset.image, criterion: select.dataset.criterion,
                score: Number(select.value)}};
  try {{
    const reply = await fetch("answer", {{method: "POST", body: JSON.stringify(body),
                                         headers: {{"Content-Type": "application/json"}}}});
    select.classList.add(reply.ok ? "saved" : "failed");
  }} catch (error) {{ select.classList.add("failed"); }}
  progress();
}}
selects.forEach(s => s.addEventListener("change", () => {{ if (s.value !== "") save(s); }}));
async function restore() {{
  if (!rater) return;
  const reply = await fetch("answers?rater=" + encodeURIComponent(rater));
  const given = await reply.json();
  for (const a of given) {{
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


def make_server(study: Path, variant: str, port: int = 0,
                database: Path | None = None) -> ThreadingHTTPServer:
    """A server of one questionnaire variant on 127.0.0.1 (not started: call
    ``serve_forever``); ``server.server_port`` is the port, useful with ``port=0``."""
    folder = StudyFolder(Path(study))
    questionnaire = folder.questionnaire()
    if variant not in questionnaire["variants"]:
        raise ValueError(f"{folder.questionnaire_file}: no variant {variant!r}")
    store = AnswerStore(database or folder.database)
    page = questionnaire_page(questionnaire, variant).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                self._reply(HTTPStatus.OK, "text/html; charset=utf-8", page)
            elif url.path == "/answers":
                rater = parse_qs(url.query).get("rater", [""])[0]
                rows = store.answers(rater)
                rows = rows[rows["variant"] == variant]
                self._reply(HTTPStatus.OK, "application/json",
                            rows.to_json(orient="records").encode())
            elif (match := _IMAGE_NAME.match(url.path)) and (
                    path := folder.image_dir / f"{match.group(1)}.png").is_file():
                self._reply(HTTPStatus.OK, "image/png", path.read_bytes())
            else:
                self._reply(HTTPStatus.NOT_FOUND, "text/plain", b"not found")

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/answer":
                self._reply(HTTPStatus.NOT_FOUND, "text/plain", b"not found")
                return
            try:
                row = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                row = {**row, "variant": variant}
                problem = answer_problem(row, questionnaire)
            except (ValueError, AttributeError, TypeError) as error:
                problem = f"not a JSON answer ({error})"
            if problem:
                self._reply(HTTPStatus.BAD_REQUEST, "text/plain", problem.encode())
                return
            store.record([{**row, "score": int(row["score"]), "rater": row["rater"].strip()}])
            self._reply(HTTPStatus.OK, "application/json", b'{"saved": true}')

        def _reply(self, status: HTTPStatus, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return ThreadingHTTPServer((HOST, port), Handler)


def serve(config: StudyServeConfig) -> None:
    """Serve one questionnaire until interrupted (Ctrl-C)."""
    server = make_server(config.study, config.variant, config.port, config.database)
    log.info("questionnaire %s on http://%s:%d/ (answers in %s); Ctrl-C stops", config.variant,
             HOST, server.server_port, config.database or StudyFolder(config.study).database)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
