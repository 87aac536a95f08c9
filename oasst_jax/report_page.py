"""Sampling reports side by side: one self-contained HTML page.

    python -m oasst_jax.sample compare a.json b.json ... --out compare.html

Rows are prompts (in the order they first appear across the reports), columns are
the reports (a model or checkpoint each), and a select element switches which
sampling config's replies show (``#config=N`` in the URL picks one on load).  The
page has no external resource (inline CSS and script, no CDN), so it opens from a
file on a machine without network, and every text is HTML-escaped.  Its script
checks on load that it rendered every prompt row with a cell per report and
records the outcome, or any script error, as ``data-status`` on ``<body>`` ("ok"
or "error: ..."), which a headless browser test reads back.

Why replies sit in the page for every config at once rather than in a JSON blob the
script renders: the page reads without JavaScript (the first config shows), and
what the browser shows is plain escaped HTML a parser can check.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

# A prompt row's key: the prompt and which occurrence of it (a prompt file may repeat one).
RowKey = tuple[str, int]


def load_report(path: str) -> dict[str, Any]:
    """A sampling report (``oasst_jax.sample``'s schema) read and checked: one-line
    ``ValueError`` naming the file and the first field that does not fit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such report file")
    with open(path, encoding="utf-8") as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a sampling report (not JSON: {e.msg})") from None
    check_report(report, path)
    return report


def check_report(report: Any, where: str) -> None:
    """Raise a one-line ``ValueError`` unless ``report`` has the fields the page reads."""

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"{where}: not a sampling report ({field} should be {expected})")

    if not isinstance(report, dict):
        raise bad("the top level", "an object")
    prompts = report.get("prompts")
    if not isinstance(prompts, list):
        raise bad("'prompts'", "a list")
    for n, entry in enumerate(prompts):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise bad(f"prompts[{n}]", 'an object with a "prompt" string')
        if not isinstance(entry.get("results"), list):
            raise bad(f"prompts[{n}].results", "a list")
        names = set()
        for r, result in enumerate(entry["results"]):
            field = f"prompts[{n}].results[{r}]"
            if not isinstance(result, dict) or not isinstance(result.get("sampling_config"), str):
                raise bad(field, 'an object with a "sampling_config" string')
            outputs = result.get("outputs")
            if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                raise bad(f"{field}.outputs", "a list of strings")
            if result["sampling_config"] in names:
                raise bad(f"{field}.sampling_config", "unique within a prompt")
            names.add(result["sampling_config"])


def column_names(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """A header per report: its ``model_name`` (else the file name), with the file name
    added where two reports share a model name."""
    names = [str(r.get("model_name") or os.path.basename(path)) for path, r in reports]
    return [
        f"{name} ({os.path.basename(path)})" if names.count(name) > 1 else name
        for name, (path, _) in zip(names, reports, strict=True)
    ]


def _row_keys(report: Mapping[str, Any]) -> list[RowKey]:
    seen: dict[str, int] = {}
    keys = []
    for entry in report["prompts"]:
        k = seen.get(entry["prompt"], 0)
        seen[entry["prompt"]] = k + 1
        keys.append((entry["prompt"], k))
    return keys


def table(
    reports: Sequence[Mapping[str, Any]],
) -> tuple[list[RowKey], list[str], dict[tuple[RowKey, int, str], list[str]]]:
    """``(rows, configs, outputs)``: the prompt rows and sampling configs in first-seen
    order over all reports, and the outputs by ``(row, report index, config)``."""
    rows: dict[RowKey, None] = {}
    configs: dict[str, None] = {}
    outputs: dict[tuple[RowKey, int, str], list[str]] = {}
    for col, report in enumerate(reports):
        for key, entry in zip(_row_keys(report), report["prompts"], strict=True):
            rows.setdefault(key)
            for result in entry["results"]:
                configs.setdefault(result["sampling_config"])
                outputs[key, col, result["sampling_config"]] = list(result["outputs"])
    return list(rows), list(configs), outputs


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }
thead th { background: #f3f3f3; position: sticky; top: 0; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.prompt { background: #fafafa; }
.sample + .sample { border-top: 1px dashed #ccc; margin-top: 4px; padding-top: 4px; }
.missing { color: #999; font-style: italic; }
.meta { color: #666; font-size: 12px; font-weight: normal; }
"""

# Runs first: records a script error or console.error in data-status before anything else.
_GUARD = """
window.__errors = [];
function setStatus() {
  document.body.setAttribute(
    "data-status", window.__errors.length ? "error: " + window.__errors.join("; ") : "ok");
}
window.onerror = function (msg, src, line) {
  window.__errors.push(msg + " (line " + line + ")");
  if (document.body) setStatus();
};
(function () {
  var original = console.error;
  console.error = function () {
    window.__errors.push(Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
"""

_SCRIPT = """
function chosenFromUrl(select) {
  var m = /(?:^|[#&?])config=(\\d+)/.exec(location.hash + "&" + location.search);
  var n = m ? parseInt(m[1], 10) : 0;
  if (n >= select.options.length) {
    window.__errors.push("config=" + n + " but the page has " + select.options.length);
    n = 0;
  }
  return n;
}
function show(n) {
  var blocks = document.querySelectorAll("[data-config]");
  for (var i = 0; i < blocks.length; i++) {
    blocks[i].hidden = blocks[i].getAttribute("data-config") !== String(n);
  }
  document.body.setAttribute("data-shown-config", String(n));
}
function check() {
  var table = document.getElementById("replies");
  var want = parseInt(table.getAttribute("data-prompts"), 10);
  var cols = parseInt(table.getAttribute("data-columns"), 10);
  var rows = table.tBodies[0].rows;
  if (rows.length !== want) {
    window.__errors.push("rendered " + rows.length + " prompt rows of " + want);
  }
  for (var i = 0; i < rows.length; i++) {
    if (rows[i].cells.length !== cols + 1) {
      window.__errors.push("row " + i + " has " + rows[i].cells.length + " cells");
    }
  }
}
document.addEventListener("DOMContentLoaded", function () {
  try {
    var select = document.getElementById("config");
    select.value = String(chosenFromUrl(select));
    show(select.value);
    select.addEventListener("change", function () {
      show(select.value);
      history.replaceState(null, "", "#config=" + select.value);
    });
    check();
  } catch (e) {
    window.__errors.push(String(e));
  }
  setStatus();
});
"""


def _cell(outputs: list[str] | None) -> str:
    if outputs is None:
        return '<span class="missing">not in this report</span>'
    if not outputs:
        return '<span class="missing">no outputs</span>'
    return "".join(f'<div class="sample text">{html.escape(o)}</div>' for o in outputs)


def render(reports: Sequence[tuple[str, Mapping[str, Any]]], title: str = "") -> str:
    """The comparison page of ``(path, report)`` pairs (checked with :func:`check_report`)."""
    if not reports:
        raise ValueError("compare needs at least one report")
    rows, configs, outputs = table([r for _, r in reports])
    title = title or "Sampling reports: " + ", ".join(column_names(reports))
    options = "".join(
        f'<option value="{n}">{html.escape(c)}</option>' for n, c in enumerate(configs)
    )
    head = ['<th scope="col">prompt</th>']
    for name, (path, report) in zip(column_names(reports), reports, strict=True):
        meta = [str(report.get("date", ""))]
        if isinstance(report.get("tokens_per_second"), int | float):
            meta.append(f"{report['tokens_per_second']:.1f} tokens/s")
        head.append(
            f'<th scope="col" title="{html.escape(path)}">{html.escape(name)}'
            f'<div class="meta">{html.escape(" · ".join(m for m in meta if m))}</div></th>'
        )
    body = []
    for key in rows:
        cells = [f'<th scope="row" class="prompt text">{html.escape(key[0])}</th>']
        for col in range(len(reports)):
            blocks = [
                f'<div data-config="{n}"{" hidden" if n else ""}>'
                f"{_cell(outputs.get((key, col, config)))}</div>"
                for n, config in enumerate(configs)
            ]
            cells.append(f"<td>{''.join(blocks)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script>{_GUARD}</script></head>"
        '<body data-status="pending">'
        f"<h1>{html.escape(title)}</h1>"
        f'<p><label>sampling config <select id="config">{options}</select></label> '
        f"{len(rows)} prompts, {len(reports)} reports</p>"
        f'<table id="replies" data-prompts="{len(rows)}" data-columns="{len(reports)}">'
        f"<thead><tr>{''.join(head)}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
