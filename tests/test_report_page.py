"""The sampling-report comparison page: its HTML structure (html.parser), its behaviour in a
real headless browser (chromium), and the ``sample compare`` command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from oasst_jax import report_page
from oasst_jax.cli import sample

VOID = {"meta", "br", "hr", "img", "input", "link"}
NASTY = "a <script>alert(\"x\")</script> & 'quotes'\n  second line"


def _report(name: str, prompts: dict[str, dict[str, list[str]]]) -> dict:
    """A report in ``sample``'s schema: ``{prompt: {config: outputs}}``."""
    entries = [
        {
            "prompt": prompt,
            "results": [
                {"sampling_config": c, "sampling_params": {}, "outputs": outs, "output_ids": []}
                for c, outs in configs.items()
            ],
        }
        for prompt, configs in prompts.items()
    ]
    return {"model_name": name, "date": "2026-11-30", "tokens_per_second": 12.5, "prompts": entries}


# Two checkpoints, two configs; "only in a" is missing from b, b lacks "t0.7" for "hello".
A = _report(
    "ckpt-a",
    {
        "hello": {"greedy": ["a greedy hello"], "t0.7": ["a sampled 1", "a sampled 2"]},
        NASTY: {"greedy": ["a greedy nasty <b>"], "t0.7": ["a sampled nasty"]},
        "only in a": {"greedy": ["a alone"], "t0.7": ["a alone sampled"]},
    },
)
B = _report(
    "ckpt-b",
    {
        "hello": {"greedy": ["b greedy hello"]},
        NASTY: {"greedy": ["b greedy nasty"], "t0.7": ["b sampled nasty & co"]},
    },
)
PROMPTS = ["hello", NASTY, "only in a"]


class Tree(HTMLParser):
    """Elements as ``(tag, attrs, text)`` with every end tag checked against the open one."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[dict] = []
        self.elements: list[dict] = []
        self.errors: list[str] = []
        self.feed(page)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {[e['tag'] for e in self.stack]}")

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "parent": None}
        if self.stack:
            element["parent"] = self.stack[-1]
        self.elements.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1]["tag"] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1]['tag'] if self.stack else None}")
            return
        self.stack.pop()

    def handle_data(self, data):
        for element in self.stack:
            element["text"] += data

    def find(self, tag: str, **attrs) -> list[dict]:
        return [
            e
            for e in self.elements
            if e["tag"] == tag and all(e["attrs"].get(k) == v for k, v in attrs.items())
        ]

    def rows(self) -> list[list[dict]]:
        """Body rows of the replies table, each a list of its cells."""
        (tbody,) = self.find("tbody")
        rows = [e for e in self.elements if e["tag"] == "tr" and e["parent"] is tbody]
        return [[c for c in self.elements if c["parent"] is r] for r in rows]

    def shown(self, cell: dict) -> dict[str, str]:
        """``{data-config: text}`` of a cell's config blocks that are not hidden."""
        blocks = [e for e in self.elements if e["parent"] is cell and "data-config" in e["attrs"]]
        return {b["attrs"]["data-config"]: b["text"] for b in blocks if "hidden" not in b["attrs"]}


def _page(tmp_path, reports=(A, B)) -> str:
    paths = []
    for n, report in enumerate(reports):
        path = tmp_path / f"r{n}.json"
        path.write_text(json.dumps(report))
        paths.append(str(path))
    out = tmp_path / "report_page.html"
    sample.main(["compare", *paths, "--out", str(out)])
    return str(out)


def _check_replies(tree: Tree, config: int) -> None:
    """Every prompt a row, in order; each cell shows only ``config``'s replies."""
    name = ["greedy", "t0.7"][config]
    rows = tree.rows()
    assert [r[0]["text"] for r in rows] == PROMPTS
    for row, prompt in zip(rows, PROMPTS, strict=True):
        assert len(row) == 3  # prompt + one cell per report
        for cell, report in zip(row[1:], (A, B), strict=True):
            entry = {e["prompt"]: e for e in report["prompts"]}.get(prompt)
            results = {r["sampling_config"]: r["outputs"] for r in (entry or {}).get("results", [])}
            shown = tree.shown(cell)
            assert list(shown) == [str(config)]
            expected = "".join(results[name]) if name in results else "not in this report"
            assert shown[str(config)] == expected


def test_page_structure_and_escaping(tmp_path):
    """Never skipped: the page parses with balanced tags, holds no external resource, and
    shows the first config without any script having run."""
    page = open(_page(tmp_path), encoding="utf-8").read()
    tree = Tree(page)
    assert tree.errors == []
    assert page.startswith("<!DOCTYPE html>")
    assert not tree.find("link") and all("src" not in e["attrs"] for e in tree.find("script"))
    assert "http://" not in page and "https://" not in page
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page  # escaped text
    (select,) = tree.find("select", id="config")
    assert [o["text"] for o in tree.find("option")] == ["greedy", "t0.7"]
    assert [h["text"].split("2026")[0] for h in tree.find("th", scope="col")] == [
        "prompt",
        "ckpt-a",
        "ckpt-b",
    ]
    (table,) = tree.find("table", id="replies")
    assert table["attrs"]["data-prompts"] == "3" and table["attrs"]["data-columns"] == "2"
    _check_replies(tree, 0)


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium binary on PATH (Debian/Ubuntu: apt-get install -y chromium)",
)
@pytest.mark.parametrize("config", [0, 1])
def test_page_in_a_headless_browser(tmp_path, config):
    """The page's own script ran without error, checked its rows (data-status) and switched
    to the config the URL names."""
    url = f"file://{_page(tmp_path)}#config={config}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url]
    cmd.insert(1, f"--user-data-dir={tmp_path / 'profile'}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tree = Tree(proc.stdout)
    (body,) = tree.find("body")
    assert body["attrs"]["data-status"] == "ok"
    assert body["attrs"]["data-shown-config"] == str(config)
    _check_replies(tree, config)


def test_page_script_reports_a_wrong_config(tmp_path):
    """A config the page does not have is recorded as an error by the page itself."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian/Ubuntu: apt-get install -y chromium)")
    url = f"file://{_page(tmp_path)}#config=7"
    cmd = [chromium, f"--user-data-dir={tmp_path / 'profile'}", "--headless", "--no-sandbox"]
    proc = subprocess.run(
        [*cmd, "--disable-gpu", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    (body,) = Tree(proc.stdout).find("body")
    assert body["attrs"]["data-status"] == "error: config=7 but the page has 2"


def _exit_line(argv) -> str:
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "missing.json: no such report file"),
        ("{not json", "not a sampling report (not JSON"),
        ('{"prompts": 3}', "not a sampling report ('prompts' should be a list)"),
        (
            '{"prompts": [{"prompt": "x", "results": [{"sampling_config": "g", "outputs": [1]}]}]}',
            "prompts[0].results[0].outputs should be a list of strings",
        ),
    ],
)
def test_bad_report_is_one_line_and_writes_nothing(tmp_path, content, message):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(A))
    bad = tmp_path / "missing.json"
    if content is not None:
        bad.write_text(content)
    out = tmp_path / "report_page.html"
    line = _exit_line(["compare", str(good), str(bad), "--out", str(out)])
    assert line.startswith("error: ") and message in line, line
    assert not out.exists() and sorted(os.listdir(tmp_path)) == sorted(
        ["good.json"] + (["missing.json"] if content is not None else [])
    )


def test_column_names_tell_same_named_reports_apart():
    assert report_page.column_names([("x/a.json", A), ("y/b.json", A), ("c.json", B)]) == [
        "ckpt-a (a.json)",
        "ckpt-a (b.json)",
        "ckpt-b",
    ]
