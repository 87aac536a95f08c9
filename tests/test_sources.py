"""Dataset loaders on the checked-in fixtures (``tests/data``, see ``make_fixtures.py``).

Expected counts are derived by hand from the recipe's rules and the fixture comments.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import hf_cache
import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from oasst_jax.config import load_config
from oasst_jax.data.sources import (
    LOADERS,
    OPTIONS,
    REFUSAL_PHRASES,
    PhraseFilter,
    clean_context,
    load_dataset,
)
from oasst_jax.readers import iter_tar_jsonl, read_records
from oasst_jax.turns import ROLES, DataError, Turn

DATA = Path(__file__).parent / "data"
CARD_CONFIG = Path(REPO) / "configs" / "data" / "oasst_pre10_min25.py"
CARD_LANGS = "bg,ca,cs,da,de,en,es,fr,hr,hu,it,nl,pl,pt,ro,ru,sl,sr,sv,uk"
TAR = DATA / "oasst_ready.tar.gz"
JSONL_GZ = DATA / "oasst_export.jsonl.gz"

# Tree-level skips, whatever top_k: the bad JSON line, the line without ``prompt``
# (missing_field), t9 (assistant replying to an assistant: role_order), t5 (root lang "ja"),
# t6 (tree_state "growing"), t7 (root review_result false).
TREE_SKIPS = {
    "bad_json": 1,
    "missing_field": 1,
    "role_order": 1,
    "language": 1,
    "tree_state": 1,
    "review_result": 1,
}
# Thread-level skips independent of top_k: t1's P5 (a prompter leaf that is A1's second
# reply), t4's A3 and P7 (deleted; P7 is a removed prompter leaf but still counts), t10's A1
# (deleted), t4's A5 (synthetic).  t11 (a root alone) has no path of length > 1.
THREAD_SKIPS = {"prompter_leaf": 1, "deleted": 3, "synthetic": 1}
# Trees that pass the tree filter (card languages), in file order: upstream's split units,
# t10 and t11 included although they yield no thread.
ACCEPTED_TREES = ["t1", "t2", "t3", "t4", "t8", "t10", "t11"]

# (tree, message numbers) of each expected thread; ``tK-mN`` ids are pre-order numbers.
# top_k=None: every root-to-leaf path that survives the leaf/deleted/synthetic rules.
#   t1: P0-A1-P2-A3, P0-A1-P2-A4, P0-A6, P0-A7 (P5 is not A1's first reply: dropped)
#   t2: P0-A1-P2-A3, P0-A4, P0-A5
#   t3: P0-A1 (the leaf P2 is A1's first reply: kept, then removed), P0-A1-P3-A4
#   t4: P0-A1-P2-A4 only (A3 deleted, A5 synthetic, P7 deleted)
#   t8: the 6-message chain (A3's own lang/review_result are not checked)
THREADS_ALL = [
    ("t1", [0, 1, 2, 3]),
    ("t1", [0, 1, 2, 4]),
    ("t1", [0, 6]),
    ("t1", [0, 7]),
    ("t2", [0, 1, 2, 3]),
    ("t2", [0, 4]),
    ("t2", [0, 5]),
    ("t3", [0, 1]),
    ("t3", [0, 1, 3, 4]),
    ("t4", [0, 1, 2, 4]),
    ("t8", [0, 1, 2, 3, 4, 5]),
]
# top_k=1: every assistant must be rank 0, or rank None as an only child.
#   t1: only P0-A1-P2-A3 (A4 r1, A6 r1, A7 r2 dropped: 3 top_k)
#   t2: P0-A1-P2-A3 (A3 rNone but only child); A4 rNone with 2 siblings and A5 r1: 2 top_k
#   t3: both (A4 is an rNone only child); t4: A4 r1 dropped (1 top_k); t8 kept.
THREADS_TOP1 = [
    ("t1", [0, 1, 2, 3]),
    ("t2", [0, 1, 2, 3]),
    ("t3", [0, 1]),
    ("t3", [0, 1, 3, 4]),
    ("t8", [0, 1, 2, 3, 4, 5]),
]
# top_k=2: ranks 0 and 1 pass; t1's A7 r2 and t2's A4 (rNone with siblings) are dropped.
THREADS_TOP2 = [t for t in THREADS_ALL if t not in [("t1", [0, 7]), ("t2", [0, 4])]]


def oasst(path: Path = TAR, lang=CARD_LANGS, top_k=None, **extra):
    return load_dataset(
        "oasst_export", {"input_file_path": str(path), "lang": lang, "top_k": top_k, **extra}
    )


def message_texts() -> dict[str, str]:
    """message_id -> text over every parseable tree of the fixture."""
    texts = {}

    def visit(node):
        texts[node["message_id"]] = node["text"]
        for reply in node["replies"]:
            visit(reply)

    with gzip.open(JSONL_GZ, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "prompt" in record:
                visit(record["prompt"])
    return texts


def expected_samples(threads):
    texts = message_texts()
    out = []
    for tree, numbers in threads:
        roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(numbers))]
        turns = tuple(Turn(r, texts[f"{tree}-m{n}"]) for r, n in zip(roles, numbers, strict=True))
        out.append((tree, turns))
    return out


def as_pairs(result):
    return [(s.group, s.turns) for s in result.samples]


# ---------------------------------------------------------------- oasst_export


@pytest.mark.parametrize(
    "top_k, threads, top_k_skips",
    [(None, THREADS_ALL, 0), (1, THREADS_TOP1, 3 + 2 + 1), (2, THREADS_TOP2, 1 + 1)],
)
def test_oasst_threads_exact(top_k, threads, top_k_skips):
    result = oasst(top_k=top_k)
    assert result.name == "oasst_export"
    assert as_pairs(result) == expected_samples(threads)
    expected_skips = {**TREE_SKIPS, **THREAD_SKIPS}
    if top_k_skips:
        expected_skips["top_k"] = top_k_skips
    assert dict(result.skipped) == expected_skips


def test_oasst_card_counts():
    assert [len(oasst(top_k=k).samples) for k in (None, 1, 2)] == [11, 5, 9]


def test_oasst_split_units_are_all_accepted_trees():
    """Upstream splits every tree that passed the tree filter, also those without a thread
    (t10: its only reply is deleted; t11: a root alone), with torch ``random_split``."""
    for top_k in (None, 1):
        result = oasst(top_k=top_k)
        assert result.groups == ACCEPTED_TREES
        assert result.upstream_split == "random_split"
    assert {s.group for s in oasst().samples} == {"t1", "t2", "t3", "t4", "t8"}
    assert oasst(lang="en").groups == ["t1", "t4", "t10", "t11"]


def test_oasst_threads_alternate_and_end_on_assistant():
    for sample in oasst().samples:
        roles = [t.role for t in sample.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert "system" not in roles


def test_oasst_top1_keeps_only_rank0_assistants():
    texts = message_texts()
    rank = {}

    def visit(node):
        rank[node["text"]] = node["rank"]
        for reply in node["replies"]:
            visit(reply)

    with gzip.open(JSONL_GZ, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                visit(json.loads(line)["prompt"])
            except (ValueError, KeyError):
                continue
    assert texts  # fixture parsed
    for sample in oasst(top_k=1).samples:
        assert all(rank[t.text] in (0, None) for t in sample.turns if t.role == "assistant")


def test_oasst_language_filter():
    en = oasst(lang="en")
    assert {s.group for s in en.samples} == {"t1", "t4"}
    assert len(en.samples) == 5
    # t2 de, t3 fr, t5 ja, t8 es are now all language skips
    assert en.skipped["language"] == 4
    assert as_pairs(oasst(lang=["en"])) == as_pairs(en)
    assert as_pairs(oasst(lang=" en , de ")) == as_pairs(oasst(lang=["de", "en"]))
    # "ja" is not in the card's list; naming it brings t5 back
    assert {s.group for s in oasst(lang="ja").samples} == {"t5"}


def test_oasst_group_is_tree_id():
    groups = [s.group for s in oasst().samples]
    assert groups == [tree for tree, _ in THREADS_ALL]


def test_oasst_input_formats_identical(tmp_path):
    plain = tmp_path / "export.jsonl"
    plain.write_bytes(gzip.decompress(JSONL_GZ.read_bytes()))
    results = [oasst(p, top_k=1) for p in (TAR, JSONL_GZ, plain)]
    assert as_pairs(results[0]) == as_pairs(results[1]) == as_pairs(results[2])
    assert results[0].skipped == results[1].skipped == results[2].skipped


def test_oasst_config_dict_options_and_extra_keys():
    options = ml_collections.ConfigDict(
        {"input_file_path": str(TAR), "lang": CARD_LANGS, "top_k": 1, "val_split": 0.05}
    )
    assert as_pairs(load_dataset("oasst_export", options)) == as_pairs(oasst(top_k=1))


def _tree(tree_id, prompt, state="ready_for_export"):
    return json.dumps({"message_tree_id": tree_id, "tree_state": state, "prompt": prompt})


def _node(role, text="Some text here.", replies=(), **fields):
    node = {"message_id": text, "role": role, "text": text, "lang": "en", "review_result": True}
    return {**node, **fields, "replies": list(replies)}


def test_oasst_malformed_lines_counted(tmp_path):
    good = _node("prompter", "q", [_node("assistant", "a", rank=0)])
    lines = [
        _tree("ok", good),
        "",  # blank lines are ignored
        "[1, 2]",  # valid JSON, not an object
        _tree("notext", _node("prompter", "q", [{"role": "assistant", "rank": 0}])),
        _tree("boolrank", _node("prompter", "q", [_node("assistant", "a", rank=True)])),
        _tree("badrole", _node("prompter", "q", [_node("moderator", "a")])),
        _tree("assistantroot", _node("assistant", "a")),
        json.dumps({"tree_state": "ready_for_export", "prompt": good}),  # no tree id
        _tree("empty", _node("prompter", "q", [_node("assistant", "  ", rank=0)])),
        _tree("lonely", _node("prompter", "q")),  # no replies: no thread, not an error
    ]
    path = tmp_path / "x.jsonl"
    path.write_bytes("\n".join(lines).encode() + b'\n{"message_tree_id": "\xff"}\n')  # not UTF-8
    result = oasst(path)
    assert [s.group for s in result.samples] == ["ok"]
    assert result.groups == ["ok", "empty", "lonely"]  # passed the tree filter
    assert dict(result.skipped) == {
        "bad_json": 2,
        "missing_field": 2,
        "bad_field": 1,
        "role_order": 2,
        "empty_text": 1,
    }


@pytest.mark.parametrize("source, name", [(JSONL_GZ, "x.jsonl.gz"), (TAR, "x.tar.gz")])
def test_oasst_truncated_input_is_data_error(tmp_path, source, name):
    path = tmp_path / name
    path.write_bytes(source.read_bytes()[:-40])
    with pytest.raises(DataError, match=name):
        oasst(path)


@pytest.mark.parametrize("top_k", [0, -1, 1.5, "1", True])
def test_oasst_bad_top_k(top_k):
    with pytest.raises(DataError, match="top_k"):
        oasst(top_k=top_k)


# ---------------------------------------------------------------- tar safety


def _write_tar(path: Path, build) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return path


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_special(tar: tarfile.TarFile, name: str, kind: bytes, target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


@pytest.mark.parametrize(
    "member, build",
    [
        ("/etc/trees.jsonl", lambda t: _add_file(t, "/etc/trees.jsonl", b"{}")),
        ("../trees.jsonl", lambda t: _add_file(t, "../trees.jsonl", b"{}")),
        ("a/../../trees.jsonl", lambda t: _add_file(t, "a/../../trees.jsonl", b"{}")),
        ("link.jsonl", lambda t: _add_special(t, "link.jsonl", tarfile.SYMTYPE, "/etc/passwd")),
        ("hard.jsonl", lambda t: _add_special(t, "hard.jsonl", tarfile.LNKTYPE, "x")),
        ("dev.jsonl", lambda t: _add_special(t, "dev.jsonl", tarfile.CHRTYPE)),
        ("fifo", lambda t: _add_special(t, "fifo", tarfile.FIFOTYPE)),
    ],
)
def test_unsafe_tar_member_refused(tmp_path, member, build):
    def with_good_member(tar):
        _add_file(tar, "ok/trees.jsonl.gz", JSONL_GZ.read_bytes())
        build(tar)

    path = _write_tar(tmp_path / "evil.tar.gz", with_good_member)
    with pytest.raises(DataError, match="refusing") as err:
        oasst(path)
    assert repr(member) in str(err.value)


def test_tar_prefers_trees_member(tmp_path):
    def build(tar):
        _add_file(tar, "x/2023_oasst_ready.messages.jsonl.gz", gzip.compress(b'{"a": 1}\n'))
        _add_file(tar, "x/2023_oasst_ready.trees.jsonl.gz", JSONL_GZ.read_bytes())

    path = _write_tar(tmp_path / "both.tar.gz", build)
    assert as_pairs(oasst(path)) == as_pairs(oasst(JSONL_GZ))


@pytest.mark.parametrize("names", [[], ["a.jsonl", "b.jsonl"]])
def test_tar_needs_exactly_one_jsonl(tmp_path, names):
    def build(tar):
        _add_file(tar, "README.md", b"hello")
        for name in names:
            _add_file(tar, name, b"{}\n")

    with pytest.raises(DataError, match="exactly one"):
        oasst(_write_tar(tmp_path / "t.tar.gz", build))


# ---------------------------------------------------------------- instruction datasets


def megacode(**options):
    return load_dataset("megacode2", {"path": str(DATA / "megacode2.json"), **options})


def test_megacode2_counts():
    # 40 rows: rows 3 (USER "") and 7 (ASSISTANT "   ") empty, rows 11 (no ASSISTANT) and 15
    # (USER null) missing; rows 20 and 31 have a refusal in the answer, row 25 in the question
    # only: upstream's phrase list (the default) drops all three.
    result = megacode()
    assert result.name == "InstructionDataset (megacode2)"
    assert len(result.samples) == 33
    assert dict(result.skipped) == {"empty_text": 2, "missing_field": 2, "phrase_filter": 3}
    assert {"megacode2:20", "megacode2:25", "megacode2:31"}.isdisjoint(
        s.group for s in result.samples
    )
    for sample in result.samples:
        assert [t.role for t in sample.turns] == ["user", "assistant"]
    off = megacode(phrase_filter=[])  # an empty list turns the filter off
    assert len(off.samples) == 36 and "phrase_filter" not in off.skipped
    with pytest.raises(DataError, match="phrase_filter must be a list of strings"):
        megacode(phrase_filter=[1])


def test_refusal_phrases_are_upstreams():
    assert len(REFUSAL_PHRASES) == 36  # as listed in custom_datasets/utils.py (a duplicate)
    assert len(set(REFUSAL_PHRASES)) == 34
    assert REFUSAL_PHRASES[3] == "As an AI " and REFUSAL_PHRASES[-1] == "OpenAI"
    assert {"I'm an AI ", "I am an AI "} < set(REFUSAL_PHRASES)  # trailing space matters


def test_phrase_filter_matches_upstreams_per_phrase_search():
    """The one-pass automaton drops exactly the texts upstream's ``any(word.lower() in
    text.lower() ...)`` drops: phrases inside phrases, trailing spaces, case, non-ASCII,
    a phrase at either end of the text or across a line break."""
    refused = PhraseFilter(REFUSAL_PHRASES)
    rng = np.random.default_rng(0)
    words = [
        "as",
        "an",
        "AI",
        "ai ",
        "I'm",
        "OpenAI",
        "language",
        "model,",
        "Äs",
        "中文",
        "\n",
        "cannot",
        "assist",
        "my",
        "knowledge",
        "cut",
        "off",
        "sorry,",
        " ",
        "İ",
        "🙂",
    ]
    texts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(3000)]
    texts += [p for p in REFUSAL_PHRASES] + [p.upper()[1:] for p in REFUSAL_PHRASES] + [""]
    upstream = [any(p.lower() in t.lower() for p in REFUSAL_PHRASES) for t in texts]
    assert [refused(t) for t in texts] == upstream
    assert 200 < sum(upstream) < len(texts) - 200  # both outcomes well exercised
    assert refused("fine", "As an AI model") and not refused("fine", "fine too")
    assert not PhraseFilter(())("As an AI ") and not PhraseFilter([""])("anything")


@pytest.mark.parametrize(
    "row, dropped",
    [
        ({"USER": "Hi, as an AI language model can you?", "ASSISTANT": "Sure."}, True),
        ({"USER": "Can you?", "ASSISTANT": "Sorry, AS AN AI language model..."}, True),
        ({"USER": "Ask OPENAI.", "ASSISTANT": "Sure."}, True),
        ({"USER": "I am an AIrplane fan.", "ASSISTANT": "I'm an AI-free zone."}, False),
        ({"USER": "Can you?", "ASSISTANT": "As an AI\nmodel"}, False),
    ],
)
def test_phrase_filter_question_or_answer(tmp_path, row, dropped):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    for name, columns in (
        ("megacode2", {}),
        ("oa_leet10k", {"user": "USER", "assistant": "ASSISTANT"}),
    ):
        result = load_dataset(name, {"path": str(path), "columns": columns})
        assert (len(result.samples) == 0) == dropped
        assert result.skipped["phrase_filter"] == int(dropped)


def test_megacode2_phrase_filter_case_insensitive():
    result = megacode(phrase_filter=["as an ai LANGUAGE model"], fraction=0.5, max_val_set=3)
    assert len(result.samples) == 34  # rows 20 and 31; row 25's phrase is not listed
    assert dict(result.skipped) == {"empty_text": 2, "missing_field": 2, "phrase_filter": 2}


def test_megacode2_seeded_shuffle():
    rows = json.loads((DATA / "megacode2.json").read_text())
    usable = {3, 7, 11, 15, 20, 25, 31}
    order = [int(i) for i in np.random.default_rng(42).permutation(len(rows)) if i not in usable]
    result = megacode()
    assert [s.group for s in result.samples] == [f"megacode2:{i}" for i in order]
    assert result.samples[0].turns[0].text == rows[order[0]]["USER"]
    assert order != sorted(order)
    assert as_pairs(megacode()) == as_pairs(result)
    other = megacode(shuffle_seed=7)
    assert [s.group for s in other.samples] != [s.group for s in result.samples]
    assert sorted(as_pairs(other)) == sorted(as_pairs(result))


def test_instruction_columns_override(tmp_path):
    rows = [{"q": "Question one here?", "a": "Answer one here."}, {"q": "Two?", "a": ""}]
    path = tmp_path / "custom.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    result = megacode(path=str(path), columns={"user": "q", "assistant": "a"})
    assert [s.turns for s in result.samples] == [
        (Turn("user", "Question one here?"), Turn("assistant", "Answer one here."))
    ]
    assert dict(result.skipped) == {"empty_text": 1}
    with pytest.raises(DataError, match="columns"):
        megacode(columns={"system": "x"})


def test_oa_leet10k_parquet_and_jsonl_identical():
    parquet = load_dataset("oa_leet10k", {"path": str(DATA / "oa_leet10k.parquet")})
    jsonl = load_dataset("oa_leet10k", {"path": str(DATA / "oa_leet10k.jsonl")})
    assert parquet.name == "InstructionDataset (oa_leet10k)"
    assert len(parquet.samples) == 23  # 25 rows, row 12 has an empty RESPONSE, 5 a phrase
    assert dict(parquet.skipped) == {"empty_text": 1, "phrase_filter": 1}
    assert as_pairs(parquet) == as_pairs(jsonl)
    assert "oa_leet10k:12" not in {s.group for s in parquet.samples}


def test_json_array_file_errors(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"USER": "a"')
    with pytest.raises(DataError, match="broken.json"):
        megacode(path=str(path))
    path = tmp_path / "data.csv"
    path.write_text("USER,ASSISTANT\n")
    with pytest.raises(DataError, match="unsupported"):
        megacode(path=str(path))


# ---------------------------------------------------------------- orca-chat


def test_orca_chat():
    records = json.loads((DATA / "orca-chat-gpt4.json").read_text())
    result = load_dataset("orca-chat", {"path": str(DATA / "orca-chat-gpt4.json")})
    assert result.name == "OrcaChat (orca-chat)"
    assert len(result.samples) == 29  # record 29 has an exchange without "output"
    assert dict(result.skipped) == {"missing_field": 1}
    for index, sample in enumerate(result.samples):  # file order, no shuffle upstream
        record = records[index]
        assert sample.group == f"orca-chat:{index}"
        expected = [Turn("system", record["instruction"])] if record["instruction"] else []
        for exchange in record["conversation"]:
            expected += [Turn("user", exchange["input"]), Turn("assistant", exchange["output"])]
        assert list(sample.turns) == expected
    # every third record has an empty instruction and no system turn; 1-3 exchanges
    assert result.samples[0].turns[0].role == "user"
    assert result.samples[1].turns[0].role == "system"
    assert len(result.samples[2].turns) == 1 + 2 * 3
    # upstream keeps empty turns and a one-space system message; no phrase filter
    assert result.samples[5].turns[0] == Turn("system", " ")
    assert result.samples[4].turns[1] == Turn("user", "")
    assert result.samples[7].turns[-1] == Turn("assistant", "")
    assert "As an AI language model" in result.samples[10].turns[2].text


def test_orca_chat_drop_blank_turns_option():
    result = load_dataset(
        "orca-chat", {"path": str(DATA / "orca-chat-gpt4.json"), "drop_blank_turns": True}
    )
    groups = [s.group for s in result.samples]
    assert len(groups) == 27 and "orca-chat:4" not in groups and "orca-chat:7" not in groups
    assert dict(result.skipped) == {"missing_field": 1, "empty_text": 2}
    assert result.samples[groups.index("orca-chat:5")].turns[0].role == "user"  # no " " system
    with pytest.raises(DataError, match="drop_blank_turns"):
        load_dataset(
            "orca-chat", {"path": str(DATA / "orca-chat-gpt4.json"), "drop_blank_turns": 1}
        )


def test_orca_chat_empty_conversation_is_a_sample_without_turns(tmp_path):
    path = tmp_path / "orca.json"
    records = [
        {"instruction": "Be nice.", "conversation": []},
        {"instruction": "", "conversation": []},
    ]
    path.write_text(json.dumps(records))
    result = load_dataset("orca-chat", {"path": str(path)})
    assert [s.turns for s in result.samples] == [(Turn("system", "Be nice."),), ()]
    assert load_dataset("orca-chat", {"path": str(path), "drop_blank_turns": True}).samples == []


# ---------------------------------------------------------------- dolly15k_multilingual


def dolly(path=DATA / "dolly15k"):
    return load_dataset("dolly15k_multilingual", {"path": str(path), "val_split": 0.05})


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Paris is big.[1] It has a river.[1, 2]", "Paris is big. It has a river."),
        ("A note[a] and more[citation needed].", "A note and more."),
        ("Upper[A] and[Z] letters", "Upper and letters"),
        ("Range[12-14] and [ 3 ] stay", "Range[12-14] and [ 3 ] stay"),  # upstream keeps these
        ("[1,2,3][4,  5] [1 ,2]", " [1 ,2]"),
        ("[3][citation needed] ", " "),  # not stripped: a context turn of one space
        ("  padded\n", "  padded\n"),
        ("[Citation needed] [ab] [citation needed ]", "[Citation needed] [ab] [citation needed ]"),
        ("[1[a]]", "[1]"),  # in order: step 3 removes [a], leaving the [1] step 1 passed
        ("Keep [brackets] and [Note] text", "Keep [brackets] and [Note] text"),
    ],
)
def test_clean_context(raw, cleaned):
    assert clean_context(raw) == cleaned


def test_dolly_counts_order_and_context_turns():
    result = dolly()
    assert result.name == "Dolly15kMultilingual"
    # 4 splits x 10 rows: de row 2 has an empty response; es row 1 (instruction) and fr row 6
    # (response) hold a refusal phrase; de row 3's whitespace-only instruction is kept
    assert len(result.samples) == 37
    assert dict(result.skipped) == {"empty_text": 1, "phrase_filter": 2}
    groups = [s.group for s in result.samples]
    assert groups[:10] == [f"dolly15k_multilingual:en:{i}" for i in range(10)]
    for dropped in ("de:2", "es:1", "fr:6"):
        assert f"dolly15k_multilingual:{dropped}" not in groups
    assert groups[-1] == "dolly15k_multilingual:fr:9"
    by_group = {s.group: s for s in result.samples}
    assert by_group["dolly15k_multilingual:de:3"].turns[0] == Turn("user", "  ")
    for split in ("en", "de", "es", "fr"):
        rows = pq.read_table(DATA / f"dolly15k/data/{split}-00000-of-00001.parquet").to_pylist()
        for i, row in enumerate(rows):
            sample = by_group.get(f"dolly15k_multilingual:{split}:{i}")
            if sample is None:
                continue
            roles = [t.role for t in sample.turns]
            if i < 4:  # no context
                assert roles == ["user", "assistant"]
            else:  # row 9's context is only markers: one space is left, still a turn
                assert roles == ["user", "context", "assistant"]
                context = sample.turns[1].text
                assert context == clean_context(row["context"])
                if i == 9:
                    assert context == " "
                else:  # "[ 1 ]" and "[12-14]" are kept, every other marker removed
                    assert context.replace("[ 1 ] [12-14]", "").count("[") == 0
                assert sample.turns[0].text == row["instruction"]  # context not merged in
            assert sample.turns[-1].text == row["response"]


def test_dolly_drop_blank_turns_option():
    result = load_dataset(
        "dolly15k_multilingual", {"path": str(DATA / "dolly15k"), "drop_blank_turns": True}
    )
    groups = [s.group for s in result.samples]
    assert len(groups) == 36 and "dolly15k_multilingual:de:3" not in groups
    assert dict(result.skipped) == {"empty_text": 2, "phrase_filter": 2}
    nine = result.samples[groups.index("dolly15k_multilingual:en:9")]
    assert [t.role for t in nine.turns] == ["user", "assistant"]  # blank context: no turn


def test_dolly_phrase_filter_option(tmp_path):
    off = load_dataset(
        "dolly15k_multilingual", {"path": str(DATA / "dolly15k"), "phrase_filter": []}
    )
    assert len(off.samples) == 39 and dict(off.skipped) == {"empty_text": 1}


def test_dolly_jsonl_layout_identical(tmp_path):
    for split in ("en", "de", "es", "fr"):
        rows = pq.read_table(DATA / f"dolly15k/data/{split}-00000-of-00001.parquet").to_pylist()
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert as_pairs(dolly(tmp_path)) == as_pairs(dolly())


def test_dolly_missing_split(tmp_path):
    shutil.copytree(DATA / "dolly15k", tmp_path / "d")
    (tmp_path / "d/data/es-00000-of-00001.parquet").unlink()
    with pytest.raises(DataError, match="'es'"):
        dolly(tmp_path / "d")


# ---------------------------------------------------------------- registry and errors


def test_registry_and_unknown_dataset():
    assert list(LOADERS) == [
        "megacode2",
        "orca-chat",
        "dolly15k_multilingual",
        "oa_leet10k",
        "oasst_export",
    ]
    with pytest.raises(DataError, match="unknown dataset 'megacode3'.*oasst_export"):
        load_dataset("megacode3", {})


@pytest.mark.parametrize("name", list(LOADERS))
def test_missing_input_names_path(name, tmp_path):
    missing = tmp_path / "nope" / "file.json"
    with pytest.raises(DataError, match="file.json"):
        load_dataset(name, {"path": str(missing), "input_file_path": str(missing)})
    with pytest.raises(DataError, match="no input path"):
        load_dataset(name, {})


def test_roles_and_turn_validation():
    assert ROLES.index("context") == 3
    with pytest.raises(ValueError):
        Turn("prompter", "x")


# ---------------------------------------------------------------- bounded reading


def _gzip_with_long_line(line_bytes: int, before: bytes, after: bytes) -> bytes:
    """gzip of ``before``, one JSON line of ``line_bytes`` bytes, ``after`` (written in
    1 MiB pieces: the test never holds the long line either; ~1 KB per MB compressed)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as g:
        g.write(before + b'{"message_tree_id": "huge", "prompt": "')
        chunk = b"a" * 2**20
        for _ in range(line_bytes // len(chunk)):
            g.write(chunk)
        g.write(b'"}\n' + after)
    return buf.getvalue()


def test_oversize_line_is_skipped_without_being_held(tmp_path):
    """The issue's case: a tiny archive holding one huge JSON line.  The line is read
    past in chunks (peak memory ~2x the cap, not the line) and counted."""
    good = _node("prompter", "q", [_node("assistant", "a", rank=0)])
    before, after = (_tree(t, good).encode() + b"\n" for t in ("t-before", "t-after"))
    member = _gzip_with_long_line(48 * 2**20, before, after)
    path = _write_tar(
        tmp_path / "export.tar.gz", lambda t: _add_file(t, "export/x.trees.jsonl.gz", member)
    )
    assert path.stat().st_size < 200_000
    skipped = collections.Counter()
    tracemalloc.start()
    try:
        records = list(iter_tar_jsonl(path, skipped, max_bytes=2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["message_tree_id"] for r in records] == ["t-before", "t-after"]
    assert dict(skipped) == {"oversize_record": 1}
    assert peak < 4 * 2**20  # a 48 MiB line, a 1 MiB cap


def test_max_record_bytes_option_and_stats(tmp_path):
    rows = [{"USER": "q", "ASSISTANT": "a" * n} for n in (10, 5000, 20)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(megacode(path=str(path)).samples) == 3  # default cap: 16 MiB
    result = megacode(path=str(path), max_record_bytes=1000)
    assert len(result.samples) == 2 and result.skipped["oversize_record"] == 1
    with pytest.raises(DataError, match="max_record_bytes"):
        megacode(path=str(path), max_record_bytes=0)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        load_dataset("oa_leet10k", {"path": str(path)})


def test_truncated_gzip_json_array_names_the_file(tmp_path):
    path = tmp_path / "mc.json.gz"
    path.write_bytes(
        gzip.compress(json.dumps([{"USER": "q", "ASSISTANT": "a"}] * 50).encode())[:-30]
    )
    with pytest.raises(DataError, match=r"mc\.json\.gz: corrupt or truncated"):
        megacode(path=str(path))


def test_every_loader_lists_its_options():
    assert list(OPTIONS) == list(LOADERS)
    assert all("max_record_bytes" in opts for opts in OPTIONS.values())


# ---------------------------------------------------------------- hub sources


def _hub_options(name: str) -> dict:
    """The card config's source options of ``name`` (hub id and files, no path)."""
    cfg = load_config(str(CARD_CONFIG))
    return {k: v for k, v in cfg.datasets[name].to_dict().items() if k != "path"}


LOCAL = {
    "megacode2": DATA / "megacode2.json",
    "orca-chat": DATA / "orca-chat-gpt4.json",
    "dolly15k_multilingual": DATA / "dolly15k",
    "oa_leet10k": DATA / "oa_leet10k.parquet",
}


def test_card_configs_name_upstream_hub_sources():
    cfg = load_config(str(CARD_CONFIG))
    expected = {
        "megacode2": (hf_cache.MEGACODE_REPO, hf_cache.MEGACODE_FILE),
        "orca-chat": (hf_cache.ORCA_REPO, "orca-chat-gpt4.json"),
        "dolly15k_multilingual": (hf_cache.DOLLY_REPO, "data/*.parquet"),
        "oa_leet10k": (hf_cache.LEET_REPO, hf_cache.LEET_FILES),
    }
    for name, (repo_id, data_files) in expected.items():
        options = cfg.datasets[name]
        assert (options.repo_id, options.data_files, options.path) == (repo_id, data_files, None)
    for stage2 in ("oasst_top1.py", "oasst_rm.py"):  # the card's export is a local file
        export = load_config(str(CARD_CONFIG.with_name(stage2))).datasets.oasst_export
        assert export.input_file_path == "2023-07-23_oasst_ready.tar.gz" and "repo_id" not in export


@pytest.mark.parametrize("name", list(LOCAL))
def test_hub_source_reads_like_the_local_file(name, tmp_path, monkeypatch):
    """Each card dataset by its hub id, from a cache laid out as huggingface_hub's (offline):
    the same samples, groups and skips as from the local fixture (oa_leet10k's two hub
    files read in order, indices running on)."""
    hf_cache.card_cache(tmp_path / "cache")
    hf_cache.use_cache(monkeypatch, tmp_path / "cache")
    hub = load_dataset(name, _hub_options(name))
    local = load_dataset(name, {"path": str(LOCAL[name])})
    assert as_pairs(hub) == as_pairs(local) and len(local.samples) > 20
    assert hub.skipped == local.skipped and hub.name == local.name
    # a local path wins over the hub id; a local copy of the repository works as the hub's
    bogus = {**_hub_options(name), "repo_id": "nobody/nothing"}
    assert as_pairs(load_dataset(name, {**bogus, "path": str(LOCAL[name])})) == as_pairs(local)
    repo_id = _hub_options(name)["repo_id"]
    snapshot = tmp_path / "cache" / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    snapshot = snapshot / hf_cache.COMMIT
    assert as_pairs(load_dataset(name, {**bogus, "path": str(snapshot)})) == as_pairs(local)


def test_source_option_errors(tmp_path, monkeypatch):
    hf_cache.use_cache(monkeypatch, tmp_path / "cache")
    with pytest.raises(DataError, match="megacode2.data_files: which files of org/x"):
        load_dataset("megacode2", {"repo_id": "org/x"})
    with pytest.raises(DataError, match=r"oa_leet10k.data_files: which files under .*data"):
        load_dataset("oa_leet10k", {"path": str(DATA)})
    with pytest.raises(DataError, match=r"oa_leet10k.path: no file nope/\*.parquet under"):
        load_dataset("oa_leet10k", {"path": str(DATA), "data_files": ["nope/*.parquet"]})
    with pytest.raises(DataError, match="orca-chat.repo_id: org/x: HF_HUB_OFFLINE is set"):
        load_dataset("orca-chat", {"repo_id": "org/x", "data_files": "orca-chat-gpt4.json"})


# ---------------------------------------------------------------- streamed JSON arrays


def test_json_array_streamed_as_json_load_reads_it(tmp_path):
    rows = [
        {"USER": "héllo → 中文 🙂", "ASSISTANT": 'quote " back \\ slash\n\ttab'},
        {"USER": "escapes", "ASSISTANT": "ESCAPES", "n": [1, 2.5, -3e-7, None, True]},
        7,
        "a string",
        [{"USER": "in a list"}],
        {"USER": "nested", "ASSISTANT": "x", "meta": {"a": {"b": [{"c": 1}]}, "d": {}}},
        {"USER": "dup", "USER2": 1, "ASSISTANT": "last wins"},
    ]
    text = json.dumps(rows, ensure_ascii=False, indent=1).replace('"USER2": 1', '"USER": "two"')
    text = text.replace("ESCAPES", r"\u00e9\ud83d\ude00 \/ \b")  # JSON escapes, a pair
    raw = text.encode()
    for name, data in (("rows.json", raw), ("rows.json.gz", gzip.compress(raw))):
        path = tmp_path / name
        path.write_bytes(data)
        skipped = collections.Counter()
        records = list(read_records(path, skipped))
        assert records == [r for r in json.loads(text) if isinstance(r, dict)]
        assert dict(skipped) == {"bad_json": 3}
        assert isinstance(records[1]["n"][1], float)  # as json.load, not Decimal


def test_array_element_over_the_cap_is_skipped_without_being_held(tmp_path):
    """An array element larger than max_record_bytes (made of many small strings, so only the
    cap bounds what would be built) is counted and dropped while it is read."""
    path = tmp_path / "mc.json"
    piece = '"' + "x" * 1000 + '"'
    with open(path, "w") as f:
        f.write('[{"USER": "q1", "ASSISTANT": "a1"}, {"USER": "huge", "ASSISTANT": [')
        f.write(",".join([piece] * 8 * 2**10))  # ~8 MiB
        f.write(']}, {"USER": "q2", "ASSISTANT": "a2"}]')
    skipped = collections.Counter()
    tracemalloc.start()
    try:
        records = list(read_records(path, skipped, max_bytes=2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["USER"] for r in records] == ["q1", "q2"]
    assert dict(skipped) == {"oversize_record": 1}
    assert peak < 4 * 2**20  # an 8 MiB element, a 1 MiB cap
    result = megacode(path=str(path), max_record_bytes=2**20)
    assert len(result.samples) == 2 and result.skipped["oversize_record"] == 1


def test_truncated_array_element_is_one_error_naming_it(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text('[{"USER": "q", "ASSISTANT": "a"},\n {"USER": "q2", "ASSISTANT": "cut sh')
    with pytest.raises(DataError) as e:
        megacode(path=str(path))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}: invalid or truncated JSON in array element 1")
