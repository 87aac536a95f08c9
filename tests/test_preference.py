"""Preference data and losses: oasst rm-mode extraction (against an independent
reimplementation of upstream's rule), rm shards, pairs, the batch layout, the RM and DPO
losses (NumPy, TRL), segment log-probs and the reward-model export."""

import json
from pathlib import Path

import pytest

from oasst_jax.data.oasst_export import RankedSample, load_oasst_export
from oasst_jax.text import DataError

RM_FIXTURE = Path(__file__).parent / "data" / "oasst_rm.jsonl"

# ----------------------------------------------------------------------------- rm extraction
# tests/data/oasst_rm.jsonl, message texts start with their id (P = prompter, A = assistant,
# A<i>(r) = rank r, "-" = null rank, D deleted, S synthetic):
#   t1  P0 -> A1(0) -> P4 -> A5(1), A6(0) -> P8 -> A9(0), A7(2)
#          -> A2(1) -> P10 -> A11(0), A12(-)
#          -> A3(-) -> P13 -> A14(0), A15(1)
#   t2  P0 -> A1(0) -> P4 D -> A5(0), A6(1);  A2(1) D;  A3(2) -> P7 -> A8(1), A9(0), A10(-)
#   t3  P0 -> A1(0) S -> P3 -> A4(0), A5(1);  A2(1)
#   t4  not ready_for_export;  t5  root lang ja;  t9  root review_result false
#   t6  P0 -> A1(-) -> P3 (prompter leaf), A2(-);  t7  P0 -> A1(0) -> P3 -> A4(0); A2(-)
#   t8  a root without replies
#   t10 P0 -> A1(1) -> P3 -> A4(0) -> P6 -> A7(1), A8(1), A9(0);  A5(1);  A2(0)


def _thread_filter(thread, top_k):
    """Upstream's ``thread_filter`` (``oasst_dataset.py``), as written there."""
    if any(m["deleted"] or m["synthetic"] for m in thread):
        return False
    if top_k is not None:
        for i, m in enumerate(thread):
            if m["role"] == "assistant":
                if m["rank"] is None:
                    if i > 0 and len(thread[i - 1]["replies"]) > 1:
                        return False
                elif m["rank"] >= top_k:
                    return False
    return True


def _visit(node, parents, top_k, out, tree_id):
    """``visit_threads_depth_first`` with upstream's rm ``leaf_filter`` and
    ``process_thread`` (replies: assistant, ranked, sorted by rank)."""
    thread = parents + [node]
    ranked = [r for r in node["replies"] if r["rank"] is not None]
    if node["role"] == "prompter" and len(ranked) > 1 and _thread_filter(thread, top_k):
        replies = sorted((r for r in ranked if r["role"] == "assistant"), key=lambda r: r["rank"])
        out.append(([m["text"] for m in thread], [r["text"] for r in replies], tree_id))
    for child in node["replies"]:
        _visit(child, thread, top_k, out, tree_id)


def _upstream_rm(path, langs, top_k):
    """Upstream's ``load_oasst_export(mode="rm")`` on the raw JSON: the reference."""
    out, trees = [], []
    for line in Path(path).read_text().splitlines():
        tree = json.loads(line)
        root = tree["prompt"]
        if tree["tree_state"] == "ready_for_export" and root["review_result"]:
            if root["lang"] in langs:
                trees.append(tree["message_tree_id"])
                _visit(root, [], top_k, out, tree["message_tree_id"])
    return out, trees


def _ids(sample):
    """``(prefix ids, reply ids)`` by the message ids the fixture texts start with."""
    return [t.text.split()[0] for t in sample.prefix], [t.text.split()[0] for t in sample.replies]


@pytest.mark.parametrize("top_k", [None, 1])
def test_rm_examples_equal_the_upstream_rule(top_k):
    got = load_oasst_export({"input_file_path": str(RM_FIXTURE), "lang": "en,de",
                             "top_k": top_k, "mode": "rm"})  # fmt: skip
    want, trees = _upstream_rm(RM_FIXTURE, {"en", "de"}, top_k)
    assert all(isinstance(s, RankedSample) for s in got.samples)
    as_text = [([t.text for t in s.prefix], [t.text for t in s.replies], s.group)
               for s in got.samples]  # fmt: skip
    assert as_text == want
    assert len(want) == (9 if top_k is None else 5)
    assert got.groups == trees == ["t1", "t2", "t3", "t6", "t7", "t8", "t10"]
    for s in got.samples:
        roles = [t.role for t in s.prefix]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert len(s.replies) >= 2 and {t.role for t in s.replies} == {"assistant"}


def test_rm_examples_by_hand():
    """A few examples spelt out from the tree diagrams above."""
    got = load_oasst_export({"input_file_path": str(RM_FIXTURE), "mode": "rm"})
    ids = [(s.group, *_ids(s)) for s in got.samples]
    assert ids == [
        ("t1", ["P0"], ["A1", "A2"]),  # A3 unranked
        ("t1", ["P0", "A1", "P4"], ["A6", "A5", "A7"]),  # sorted by rank
        ("t1", ["P0", "A3", "P13"], ["A14", "A15"]),  # P8, P10: one ranked reply each
        ("t2", ["P0"], ["A1", "A2", "A3"]),  # the deleted A2 is kept, as upstream
        ("t2", ["P0", "A3", "P7"], ["A9", "A8"]),  # P4 deleted: its fragment dropped
        ("t3", ["P0"], ["A1", "A2"]),  # synthetic A1 kept as a reply, not as a prefix
        ("t10", ["P0"], ["A2", "A1"]),
        ("t10", ["P0", "A1", "P3"], ["A4", "A5"]),
        ("t10", ["P0", "A1", "P3", "A4", "P6"], ["A9", "A7", "A8"]),  # tie: reply order
    ]
    assert dict(got.skipped) == {"tree_state": 1, "language": 1, "review_result": 1,
                                 "too_few_ranked": 5, "deleted": 1, "synthetic": 1}  # fmt: skip


def test_rm_empty_messages_and_bad_mode(tmp_path):
    """Ours, where upstream would emit unusable examples: an empty reply is left out, a
    prefix with an empty message or fewer than two replies left is skipped."""
    lines = [json.loads(line) for line in RM_FIXTURE.read_text().splitlines()]
    t1 = lines[0]
    t1["prompt"]["replies"][1]["text"] = " "  # A2 of P0: P0 keeps only A1 -> skipped
    t1["prompt"]["replies"][0]["replies"][0]["replies"][2]["text"] = ""  # A7 of P4
    path = tmp_path / "t1.jsonl"
    path.write_text(json.dumps(t1) + "\n")
    got = load_oasst_export({"input_file_path": str(path), "mode": "rm"})
    assert [_ids(s) for s in got.samples] == [(["P0", "A1", "P4"], ["A6", "A5"]),
                                      (["P0", "A3", "P13"], ["A14", "A15"])]  # fmt: skip
    assert got.skipped["empty_reply"] == 2 and got.skipped["empty_text"] == 1
    with pytest.raises(DataError, match="option 'mode' must be one of sft, rm, got 'rl'"):
        load_oasst_export({"input_file_path": str(path), "mode": "rl"})
