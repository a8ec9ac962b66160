"""``RUN/report/index.html``: the sections rendered with Jinja2, readable offline.

The page loads nothing from the network: figures are PNG files under ``report/figures`` (linked
relatively, or embedded as ``data:`` URIs with ``inline``), the interactive viewers are nilearn's
standalone ``view_img`` pages saved under ``report/viewers`` (their only remote reference, a
favicon, is removed; a viewer that still references a remote URL is left out with a note), and a
Content-Security-Policy forbids any other origin.
"""

from __future__ import annotations

import base64
import datetime
import importlib.metadata
import itertools
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from voxplain.config import ReportConfig
from voxplain.io import write_json, write_text
from voxplain.report.order import TRAILING_SECTIONS, all_sections
from voxplain.report.sections import (Block, ReportContext, Section, ViewerCandidate,
                                      template_for)
from voxplain.run import RunFolder, RunFolderError

log = logging.getLogger("voxplain")

#: URLs that would make the browser leave the machine (in attributes, CSS or script strings).
REMOTE_REFERENCE = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*"""
                              r"""|url\(\s*["']?(?:https?:)?//[^)]*\)|@import\s+["']?https?:""",
                              re.IGNORECASE)
FAVICON_LINK = re.compile(r"<link\b[^>]*\brel=[\"']?icon[\"']?[^>]*>", re.IGNORECASE | re.DOTALL)


def build_report(config: ReportConfig) -> Path:
    """Render the report of ``config.run``; return the path of ``index.html``.

    Every section is built from what the run folder holds; absent results become a short note.
    Figures are written to ``OUT/figures`` (PNG plus ``config.formats``), viewers to
    ``OUT/viewers``. ``OUT/.voxplain-report.json`` lists every file the report wrote; a later
    rendering removes the files of that list it no longer writes, and never touches another
    file. An ``--out`` folder that holds files but no such list (not a voxplain report) is
    refused before anything is written.
    """
    run = RunFolder(Path(config.run))
    if not run.root.is_dir():
        raise RunFolderError(f"{run.root}: run folder not found")
    out = Path(config.out) if config.out is not None else run.root / "report"
    previous = _previous_report(out, is_default=config.out is None)
    context = ReportContext(run, config, out / "figures")
    sections = all_sections(context)
    sections.append(viewer_section(context, out / "viewers"))
    sections += all_sections(context, TRAILING_SECTIONS)
    written = {p.relative_to(out).as_posix() for s in sections for b in s.blocks
               if b.kind == "figure" for p in b.content.parent.glob(f"{b.content.stem}.*")}
    written |= {b.content.relative_to(out).as_posix() for s in sections for b in s.blocks
                if b.kind == "viewer"}
    written.add("index.html")
    for stale in sorted(previous - written):
        (out / stale).unlink(missing_ok=True)
    page = render(sections, run, out, config.inline)
    write_text(out / "index.html", page)
    write_json(out / REPORT_MANIFEST, {"files": sorted(written)})
    log.info("report written to %s", out / "index.html")
    return out / "index.html"


#: The list of files a report rendering wrote, kept in its folder.
REPORT_MANIFEST = ".voxplain-report.json"


def _previous_report(out: Path, is_default: bool) -> set[str]:
    """The files an earlier rendering wrote in ``out`` (from its list). A non-empty ``out``
    without the list is refused, unless it is the run's own ``report/`` folder (written by a
    version of voxplain before the list existed: nothing there is removed)."""
    manifest = out / REPORT_MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", [])
        return {name for name in files if isinstance(name, str) and ".." not in Path(name).parts}
    if not is_default and out.is_dir() and any(out.iterdir()):
        raise RunFolderError(f"{out}: the folder holds files that no voxplain report wrote; "
                             "give an empty or new folder to --out")
    return set()


def viewer_html(candidate: ViewerCandidate) -> str:
    """nilearn's standalone slice viewer of one map over the MNI template, network-free."""
    from nilearn import plotting

    template = template_for(candidate.values, candidate.affine)
    background = (nib.Nifti1Image(template.astype(np.float32), candidate.affine)
                  if template is not None else False)
    style = candidate.style
    view = plotting.view_img(
        nib.Nifti1Image(np.nan_to_num(candidate.values).astype(np.float32), candidate.affine),
        bg_img=background, threshold=max(style.threshold, 1e-6), vmax=style.vmax,
        vmin=None if style.signed else style.vmin, cmap=style.cmap, symmetric_cmap=style.signed,
        title=candidate.title, black_bg=False, colorbar=True, dim=0)
    return FAVICON_LINK.sub("", view.get_standalone())


def remote_references(html: str) -> list[str]:
    """The references of ``html`` that a browser would fetch from another machine."""
    return REMOTE_REFERENCE.findall(html)


def viewer_order(candidates: list[ViewerCandidate]) -> list[ViewerCandidate]:
    """Round robin over families (mask, each method), so a few viewers cover every method."""
    families: dict[str, list[ViewerCandidate]] = {}
    for candidate in candidates:
        families.setdefault(candidate.family, []).append(candidate)
    rounds = itertools.zip_longest(*families.values())
    return [candidate for round_ in rounds for candidate in round_ if candidate is not None]


def viewer_section(context: ReportContext, folder: Path) -> Section:
    section = Section("viewer", "Interactive viewer")
    limit = context.config.max_viewers
    for candidate in viewer_order(context.viewers)[:limit]:
        html = viewer_html(candidate)
        remote = remote_references(html)
        if remote:
            section.blocks.append(Block("text", f"{candidate.title}: viewer left out, its page "
                                        f"references the network ({remote[0]})."))
            continue
        path = folder / f"{candidate.name}.html"
        write_text(path, html)
        section.blocks.append(Block("viewer", path, candidate.title))
    if len(context.viewers) > limit:
        section.blocks.append(Block("text", f"{len(context.viewers) - limit} more group map(s) "
                                    f"without a viewer (max_viewers = {limit})."))
    if not context.viewers:
        section.note = "No 3D group map (mask or explanation) to browse."
    elif not limit:
        section.note = "Viewers turned off (max_viewers = 0)."
    return section


def render(sections: list[Section], run: RunFolder, out: Path, inline: bool) -> str:
    """The page: Jinja2 template ``report.html.j2`` with figures linked or embedded."""
    environment = Environment(loader=PackageLoader("voxplain.report", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    views = [{"key": s.key, "title": s.title, "note": s.note,
              "blocks": [_view(block, out, inline) for block in s.blocks]} for s in sections]
    return environment.get_template("report.html.j2").render(
        sections=views, run=str(run.root), version=importlib.metadata.version("voxplain"),
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


def _view(block: Block, out: Path, inline: bool) -> dict:
    view = {"kind": block.kind, "caption": block.caption, "content": block.content}
    if block.kind == "figure":
        path: Path = block.content
        view["src"] = (f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
                       if inline else path.relative_to(out).as_posix())
        view["downloads"] = [(p.suffix[1:], p.relative_to(out).as_posix())
                             for p in sorted(path.parent.glob(f"{path.stem}.*"))]
    elif block.kind == "viewer":
        path = block.content
        view["srcdoc"] = path.read_text() if inline else None
        view["src"] = path.relative_to(out).as_posix()
    return view
