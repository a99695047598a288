"""Self-contained HTML reports: one file that opens in a browser with no server and no network.

Our design (no paper behind it). Images are embedded as base64 PNG ``data:`` URIs, CSS is
inline, there is no JavaScript and no external font, so a report can be mailed or archived as a
single file. All text is HTML-escaped.

Building a report by hand::

    rep = Report("D-TRAK on CIFAR-2")
    rep.section("Scores").text("LDS over **64** subsets, `sign=-1`.")
    rep.table([{"method": "TRAK", "lds": 0.24}, {"method": "D-TRAK", "lds": 0.34}], "LDS")
    rep.image(roc_curve_png({...}), "ROC")
    rep.topk_grid(query, train_images, scores, labels=names, correct_mask=truth)
    rep.write("run/report.html")

Run directory results format. Methods and evaluators write *result sections* as JSON files
``run_dir/results/*.json`` (use :func:`write_result`, which validates and writes atomically);
:func:`render_run_report` turns them into ``run_dir/report.html``. One file = one section; sections
appear sorted by ``(order, file name)``. Fields::

    {
      "title":   "D-TRAK, LDS on CIFAR-2 val",          # required, string
      "order":   20,                                     # optional number, default 0
      "text":    "free text; **bold** and `code`",       # optional string (escaped; blank
                                                         #   lines separate paragraphs)
      "metrics": {"lds": 0.342, "lds_ci": [0.30, 0.38],  # optional flat object: name ->
                  "n_targets": 100, "split": "val"},     #   number | string | bool | null |
                                                         #   list of those (null = NaN/undefined)
      "tables":  [{"caption": "per-λ sweep",             # optional list; rows = list of flat
                   "rows": [{"lambda": 0.1, "lds": 0.3}, #   objects, columns = union of keys
                            {"lambda": 1.0, "lds": 0.34}]}],   in first-seen order
      "images":  ["figures/roc.png",                     # optional list; paths relative to
                  {"path": "figures/top5.png",           #   run_dir (PNG), or objects with
                   "caption": "top-5 per query"}]        #   "path" and optional "caption"
    }

Images are read from ``run_dir`` and embedded, so ``report.html`` stays valid when moved. A
missing image, an absolute path or one leaving ``run_dir``, or a malformed field raises
:class:`ReportError` naming the JSON file and the field. If ``run_dir/config.json`` exists it
is shown (pretty-printed) at the end of the report.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxattrib.report import images as _images

__all__ = ["ReportError", "Report", "write_result", "read_results", "render_run_report"]


class ReportError(ValueError):
    """A results file or report input is malformed (the message names the file and field)."""


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
  background:#f6f7f9;color:#1f2328;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh;
  box-shadow:0 0 0 1px #e4e7eb}
h1{font-size:1.7em;margin:0 0 4px}
.meta{color:#656d76;font-size:.85em;margin-bottom:18px}
h2{font-size:1.3em;border-bottom:2px solid #e4e7eb;padding-bottom:4px;margin-top:34px}
table{border-collapse:collapse;margin:10px 0 18px;font-size:.92em}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0;color:#424a53}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right}
th{background:#eef1f4}
td.s,th.s{text-align:left}
tr:nth-child(even) td{background:#f8f9fa}
figure{margin:12px 0 20px}
figure img{max-width:100%;border:1px solid #e4e7eb}
img.px{image-rendering:pixelated}
figcaption{color:#424a53;font-size:.9em;margin-top:4px}
code{background:#eef1f4;padding:0 4px;border-radius:3px;font-size:.92em}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:10px;overflow:auto;font-size:.85em}
.metrics{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 16px}
.metric{border:1px solid #d0d7de;border-radius:6px;padding:6px 12px;background:#f8fafc}
.metric .k{color:#656d76;font-size:.8em}.metric .v{font-size:1.15em;font-weight:600}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 10px}
"""


def _esc(x: Any) -> str:
    return _html.escape(str(x), quote=True)


def _inline_md(s: str) -> str:
    """Escapes ``s`` then renders ``**bold**`` and ```code``` (nothing else)."""
    s = _esc(s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return s


def _fmt(v: Any, float_fmt: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "NaN" if math.isnan(v) else float_fmt.format(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(u, float_fmt) for u in np.asarray(v, dtype=object).ravel()) + "]"
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


class Report:
    """Builder of one self-contained HTML page. Methods append content and return ``self``."""

    def __init__(self, title: str, *, subtitle: str | None = None,
                 float_fmt: str = "{:.4g}") -> None:
        self.title = str(title)
        self.subtitle = subtitle
        self.float_fmt = float_fmt
        self._parts: list[str] = []

    # -- content -------------------------------------------------------------------------------

    def section(self, title: str) -> "Report":
        """Starts a new section (an ``<h2>``)."""
        self._parts.append(f"<h2>{_esc(title)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        """Paragraphs of escaped text; blank lines separate paragraphs; ``**bold**``, ```code```."""
        for para in re.split(r"\n\s*\n", str(text).strip()):
            if para.strip():
                self._parts.append(f"<p>{_inline_md(para.strip())}</p>")
        return self

    def raw_html(self, html: str) -> "Report":
        """Appends trusted HTML unchanged (the caller is responsible for escaping)."""
        self._parts.append(str(html))
        return self

    def metrics(self, metrics: Mapping[str, Any]) -> "Report":
        """A row of name/value boxes (floats formatted with ``float_fmt``)."""
        boxes = "".join(f'<div class="metric"><div class="k">{_esc(k)}</div>'
                        f'<div class="v">{_esc(_fmt(v, self.float_fmt))}</div></div>'
                        for k, v in metrics.items())
        self._parts.append(f'<div class="metrics">{boxes}</div>')
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], caption: str | None = None) -> "Report":
        """A table from a list of flat dicts; columns = union of keys in first-seen order.

        Numbers are right-aligned and floats formatted with ``float_fmt``; a missing cell shows —.
        """
        rows = list(rows)
        cols: list[str] = []
        for r in rows:
            if not isinstance(r, Mapping):
                raise ReportError(f"table rows must be dicts; got {type(r).__name__}")
            cols += [k for k in r if k not in cols]
        numeric = {c: all(_is_num(r[c]) or r[c] is None for r in rows if c in r) for c in cols}
        head = "".join(f'<th class="{"" if numeric[c] else "s"}">{_esc(c)}</th>' for c in cols)
        body = []
        for r in rows:
            tds = "".join(f'<td class="{"" if numeric[c] else "s"}">'
                          f'{_esc(_fmt(r.get(c), self.float_fmt))}</td>' for c in cols)
            body.append(f"<tr>{tds}</tr>")
        cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
        self._parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead>"
                           f"<tbody>{''.join(body)}</tbody></table>")
        return self

    def image(self, image: bytes | np.ndarray, caption: str | None = None,
              width: int | None = None, pixelated: bool = False) -> "Report":
        """Embeds PNG bytes or an image array (``[H, W, C]`` float in [-1, 1] or uint8).

        ``width`` sets the displayed width in CSS pixels; ``pixelated`` keeps hard pixel edges
        when the browser rescales (for image grids, not for plots).
        """
        uri = _images.png_data_uri(image)
        style = f' style="width:{int(width)}px"' if width else ""
        cls = ' class="px"' if pixelated else ""
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img{cls} src="{uri}" alt="{_esc(caption or "")}"{style}>'
                           f"{cap}</figure>")
        return self

    def topk_grid(self, query_image: np.ndarray, train_images: np.ndarray, scores: np.ndarray,
                  labels: Sequence[str] | None = None, correct_mask: np.ndarray | None = None,
                  *, k: int = 8, caption: str | None = None,
                  upscale: int | None = None) -> "Report":
        """The query on the left and its top-k training images with their scores.

        Args:
          query_image: ``[H, W, C]``.
          train_images: ``[N, H, W, C]``; scores: ``[N]``; the k highest are shown, best first.
          labels: optional ``[N]`` names shown above each score (default ``#index``).
          correct_mask: optional ``[N]`` boolean ground truth: green frame = correct, red = not.
          k, caption, upscale: see :func:`jaxattrib.report.images.topk_image`.
        """
        grid, idx = _images.topk_image(query_image, train_images, scores, k=k, labels=labels,
                                       correct=correct_mask, upscale=upscale)
        text = caption or "query (left) and its top-%d training images by score" % len(idx)
        if correct_mask is not None:
            cm = np.asarray(correct_mask).reshape(-1).astype(bool)
            hits = int(cm[idx].sum())
            text += f" — {hits}/{len(idx)} correct (green), others red"
        return self.image(grid, text, pixelated=True)

    # -- output --------------------------------------------------------------------------------

    def to_html(self) -> str:
        """The whole page as a string."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        sub = f"{_esc(self.subtitle)} · " if self.subtitle else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{_esc(self.title)}</title><style>{_CSS}</style></head>"
                f"<body><main><h1>{_esc(self.title)}</h1>"
                f'<div class="meta">{sub}generated by jaxattrib, {stamp}</div>'
                + "\n".join(self._parts) + "</main></body></html>\n")

    def write(self, path: str | os.PathLike) -> Path:
        """Writes the page to ``path`` atomically (temp file in the same folder, then rename)."""
        return _images.atomic_write_bytes(path, self.to_html().encode("utf-8"))


# -------------------------------------------------------------------------------------------
# Run directory
# -------------------------------------------------------------------------------------------


def _jsonable(x: Any, where: str) -> Any:
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.ndarray):
        return [_jsonable(v, where) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, where) for v in x]
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    raise ReportError(f"{where}: cannot store a {type(x).__name__} in a results file")


def write_result(run_dir: str | os.PathLike, name: str, title: str, *,
                 metrics: Mapping[str, Any] | None = None,
                 tables: Sequence[Mapping[str, Any]] | None = None,
                 images: Sequence[str | Mapping[str, str]] | None = None,
                 text: str | None = None, order: float = 0) -> Path:
    """Writes ``run_dir/results/{name}.json`` (format in the module docstring) atomically.

    numpy scalars/arrays are converted; non-finite floats are stored as ``null``. ``tables`` are
    ``{"caption": str, "rows": [dict, ...]}``; ``images`` are paths relative to ``run_dir``.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ReportError(f"write_result: name {name!r} must be a plain file stem")
    doc: dict[str, Any] = {"title": str(title), "order": order}
    if text is not None:
        doc["text"] = str(text)
    if metrics is not None:
        doc["metrics"] = _jsonable(dict(metrics), "metrics")
    if tables is not None:
        doc["tables"] = _jsonable([dict(t) for t in tables], "tables")
    if images is not None:
        doc["images"] = _jsonable([i if isinstance(i, str) else dict(i) for i in images], "images")
    path = Path(run_dir) / "results" / f"{name}.json"
    _validate(doc, path, Path(run_dir))
    data = json.dumps(doc, indent=2, allow_nan=False).encode("utf-8")
    return _images.atomic_write_bytes(path, data)


def _validate(doc: Any, path: Path, run_dir: Path) -> list[tuple[Path, str | None]]:
    """Checks one results document; returns its images as (absolute path, caption)."""
    def err(field, msg):
        raise ReportError(f"{path}: field {field!r}: {msg}")

    if not isinstance(doc, dict):
        raise ReportError(f"{path}: expected a JSON object with a 'title'")
    if not isinstance(doc.get("title"), str) or not doc["title"]:
        err("title", "required non-empty string")
    unknown = set(doc) - {"title", "order", "text", "metrics", "tables", "images"}
    if unknown:
        err(sorted(unknown)[0], "unknown field (allowed: title, order, text, metrics, tables, "
                                "images)")
    if "order" in doc and not _is_num(doc["order"]):
        err("order", "must be a number")
    if "text" in doc and not isinstance(doc["text"], str):
        err("text", "must be a string")
    scalar = (str, int, float, bool, type(None))
    if "metrics" in doc:
        m = doc["metrics"]
        if not isinstance(m, dict):
            err("metrics", "must be an object name -> value")
        for k, v in m.items():
            if not (isinstance(v, scalar) or (isinstance(v, list)
                                              and all(isinstance(u, scalar) for u in v))):
                err(f"metrics.{k}", "must be a number, string, bool, null or a list of those")
    if "tables" in doc:
        if not isinstance(doc["tables"], list):
            err("tables", "must be a list of {caption, rows}")
        for i, t in enumerate(doc["tables"]):
            if not isinstance(t, dict) or not isinstance(t.get("rows"), list):
                err(f"tables[{i}]", "must be an object with a 'rows' list")
            for j, r in enumerate(t["rows"]):
                if not isinstance(r, dict):
                    err(f"tables[{i}].rows[{j}]", "must be an object")
    out = []
    if "images" in doc:
        if not isinstance(doc["images"], list):
            err("images", "must be a list of paths or {path, caption}")
        root = run_dir.resolve()
        for i, im in enumerate(doc["images"]):
            rel, cap = (im, None) if isinstance(im, str) else (
                (im.get("path"), im.get("caption")) if isinstance(im, dict) else (None, None))
            if not isinstance(rel, str) or not rel:
                err(f"images[{i}]", "must be a path string or an object with 'path'")
            if Path(rel).is_absolute():
                err(f"images[{i}]", f"{rel!r} must be relative to the run directory")
            full = (run_dir / rel).resolve()
            if root != full and root not in full.parents:
                err(f"images[{i}]", f"{rel!r} leaves the run directory")
            out.append((full, cap if isinstance(cap, str) else None))
    return out


def read_results(run_dir: str | os.PathLike) -> list[dict]:
    """Reads and validates ``run_dir/results/*.json``, sorted by ``(order, file name)``.

    Each returned dict is the document plus ``"_file"`` (its path) and ``"_images"`` (list of
    ``(absolute path, caption)``). Raises :class:`ReportError` for malformed files.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "results"
    if not folder.is_dir():
        raise ReportError(f"{folder}: missing; methods write their result sections there")
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not valid JSON ({e})") from e
        ims = _validate(doc, path, run_dir)
        docs.append({**doc, "_file": path, "_images": ims})
    docs.sort(key=lambda d: (float(d.get("order", 0)), d["_file"].name))
    return docs


def render_run_report(run_dir: str | os.PathLike, title: str | None = None) -> Path:
    """Renders ``run_dir/results/*.json`` into ``run_dir/report.html`` (atomically).

    Args:
      run_dir: the run directory (format of ``results/`` in the module docstring).
      title: page title; default ``"jaxattrib run: <folder name>"``.

    Returns:
      the path of ``report.html``.
    """
    run_dir = Path(run_dir)
    docs = read_results(run_dir)
    rep = Report(title or f"jaxattrib run: {run_dir.resolve().name}",
                 subtitle=f"{len(docs)} result section(s) from {run_dir / 'results'}")
    if not docs:
        rep.text("No result sections yet (`results/*.json` is empty).")
    for doc in docs:
        path = doc["_file"]
        rep.section(doc["title"])
        if doc.get("text"):
            rep.text(doc["text"])
        if doc.get("metrics"):
            rep.metrics(doc["metrics"])
        for t in doc.get("tables", []):
            rep.table(t["rows"], t.get("caption"))
        for full, cap in doc["_images"]:
            if not full.is_file():
                raise ReportError(f"{path}: field 'images': {full} does not exist")
            data = full.read_bytes()
            if data[:8] != b"\x89PNG\r\n\x1a\n":
                raise ReportError(f"{path}: field 'images': {full} is not a PNG file")
            rep.image(data, cap or full.name)
    config = run_dir / "config.json"
    if config.is_file():
        try:
            pretty = json.dumps(json.loads(config.read_text(encoding="utf-8")), indent=2)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pretty = config.read_text(encoding="utf-8", errors="replace")
        rep.section("Run configuration").raw_html(f"<pre>{_esc(pretty)}</pre>")
    return rep.write(run_dir / "report.html")
