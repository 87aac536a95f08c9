"""Arrows go one way: the package's import graph (read from the source, imports inside
functions included) has no cycle, and the layers import only what lies below them.

The commands live apart from the library, in ``oasst_jax/cli/``: a command imports the
library and never another command, and the library imports no command.  The imports of an
``if __name__ == "__main__":`` block are the script's entry, not the module's dependencies:
``oasst_jax/train.py`` (``python -m oasst_jax.train``) is such a block and nothing else."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = Path(REPO) / "oasst_jax"
TEXT_LAYER = ("oasst_jax.turns", "oasst_jax.readers", "oasst_jax.tokenizer", "oasst_jax.chatml")
VERBS = ("train", "sample", "convert", "pretokenize", "plan", "evaluate", "plot", "tokenizer")


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _module(name: str) -> str:
    """The module a dotted import name lands in (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _nodes(tree: ast.AST, *, main_blocks: bool):
    """Every node of ``tree``, with or without what ``if __name__ == "__main__":`` holds."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if main_blocks or not _is_main_block(node):
            todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, *, main_blocks: bool = False) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file (with
    ``main_blocks``: its script entry's too)."""
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in _nodes(ast.parse(path.read_text()), main_blocks=main_blocks):
        if isinstance(node, ast.Import):
            out |= {_module(a.name) for a in node.names if a.name.startswith("oasst_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base.split(".")[0] == "oasst_jax":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if sub in MODULES else _module(base))
    out.discard(me)
    return out


GRAPH = {name: _imports(path) for name, path in MODULES.items()}
COMMANDS = sorted(m for m in GRAPH if m.startswith("oasst_jax.cli."))
LIBRARY = sorted(m for m in GRAPH if m != "oasst_jax.cli" and m not in COMMANDS)


def _cycle() -> list[str]:
    """One import cycle (``[a, b, ..., a]``), or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_graph_is_read():
    assert GRAPH["oasst_jax.chatml"] >= {"oasst_jax.tokenizer", "oasst_jax.turns"}
    assert "oasst_jax.data.shards" in GRAPH["oasst_jax.data.megatron"]


def test_no_import_cycle():
    assert _cycle() == [], " -> ".join(_cycle())


def test_text_is_a_leaf():
    assert GRAPH["oasst_jax.turns"] == set()


def test_text_layer_does_not_depend_on_data():
    """tokenizer/chatml (and the leaves under them) know nothing of the dataset loaders."""
    bad = {m: sorted(GRAPH[m] - set(TEXT_LAYER)) for m in TEXT_LAYER}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_cli_is_a_leaf():
    assert GRAPH["oasst_jax.cli"] == set()


def test_every_verb_is_a_command_with_a_short_entry():
    """``python -m oasst_jax.VERB`` runs ``oasst_jax.cli.VERB``'s ``main``: the entry module
    imports nothing outside its ``__main__`` block, and that block imports the command."""
    assert COMMANDS == sorted(f"oasst_jax.cli.{v}" for v in VERBS)
    for verb in VERBS:
        entry = MODULES[f"oasst_jax.{verb}"]
        script = _imports(entry, main_blocks=True) - GRAPH[f"oasst_jax.{verb}"]
        assert script == {f"oasst_jax.cli.{verb}"}, verb
        if verb != "tokenizer":  # the tokenizer library's module is the entry too
            assert GRAPH[f"oasst_jax.{verb}"] == set(), verb


def test_no_command_imports_another_command():
    bad = {m: sorted(set(COMMANDS) & GRAPH[m]) for m in COMMANDS}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_the_library_imports_no_command():
    """Loading weights, building batches, planning: all of it is the library's, so each
    command (and a user's script) gets it without going through another command; the
    shared entry ``oasst_jax.cli`` is no command and only commands use it."""
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith("oasst_jax.cli")) for m in LIBRARY}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_data_knows_nothing_of_the_model():
    """data/ builds on the text layer, the file helpers and the hub resolver only (no model,
    jax or CLI)."""
    allowed = {"oasst_jax.turns", "oasst_jax.readers", "oasst_jax.atomic_files", "oasst_jax.hub"}
    data = [m for m in GRAPH if m.startswith("oasst_jax.data")]
    bad = {m: sorted(d for d in GRAPH[m] if not d.startswith("oasst_jax.data")) for m in data}
    assert {m: deps for m, deps in bad.items() if set(deps) - allowed} == {}


def test_loading_a_config_imports_no_sentencepiece():
    code = "import sys, oasst_jax.config; print([m for m in sys.modules if 'sentencepiece' in m])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
