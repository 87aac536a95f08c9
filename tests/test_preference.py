"""Preference data and losses: oasst rm-mode extraction (against an independent
reimplementation of upstream's rule), rm shards, pairs, the batch layout, the RM and DPO
losses (NumPy, TRL), segment log-probs and the reward-model export."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oasst_jax.data.oasst_export import RankedSample, load_oasst_export
from oasst_jax.turns import DataError

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


# ----------------------------------------------------------------------------- losses


def _rm_batch(seed=0, sizes=(2, 3, 5, 1), pad=4):
    """Slots of prompts with ``sizes`` replies (a 1-reply prompt has no pair), shuffled
    together with ``pad`` padding slots."""
    rng = np.random.default_rng(seed)
    group = np.concatenate([np.full(k, g) for g, k in enumerate(sizes)] + [np.zeros(pad, int)])
    rank = np.concatenate([np.arange(k) for k in sizes] + [np.zeros(pad, int)])
    valid = np.arange(group.size) < sum(sizes)
    order = rng.permutation(group.size)
    scores = rng.normal(0, 2, group.size)
    return scores, group[order], rank[order], valid[order]


def _numpy_rm(scores, group, rank, valid, beta):
    """The formula, pair by pair in float64, and its gradient by hand."""
    losses, grad, pairs = [], np.zeros_like(scores), []
    prompts = sorted({int(g) for g, v in zip(group, valid, strict=True) if v})
    per_prompt = {g: [] for g in prompts}
    for a in range(scores.size):
        for b in range(scores.size):
            if valid[a] and valid[b] and group[a] == group[b] and rank[a] < rank[b]:
                per_prompt[int(group[a])].append((a, b))
    counted = [g for g in prompts if per_prompt[g]]
    for g in counted:
        n = len(per_prompt[g])
        total = 0.0
        for a, b in per_prompt[g]:
            d = scores[a] - scores[b]
            total += np.log1p(np.exp(-d)) + beta * 0.5 * (scores[a] ** 2 + scores[b] ** 2)
            s = 1 / (1 + np.exp(-d))
            grad[a] += (-(1 - s) + beta * scores[a]) / n / len(counted)
            grad[b] += ((1 - s) + beta * scores[b]) / n / len(counted)
            pairs.append(d)
        losses.append(total / n)
    pairs = np.array(pairs)
    return np.mean(losses), grad, np.mean(pairs > 0), np.mean(pairs)


@pytest.mark.parametrize("beta", [0.001, 0.5])
def test_rm_loss_and_gradient_equal_the_formula(beta):
    import jax

    from oasst_jax.preference_loss import rm_loss

    scores, group, rank, valid = _rm_batch(seed=int(beta * 1000))
    want, want_grad, acc, margin = _numpy_rm(scores, group, rank, valid, beta)

    def loss(s):
        return rm_loss(s, group, rank, valid, num_groups=6, beta=beta)

    (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(scores.astype(np.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), margin, rtol=1e-5)
    assert (float(metrics["num_prompts"]), float(metrics["num_pairs"])) == (3, 1 + 3 + 10)
    assert np.all(np.asarray(grad)[~valid] == 0)
    empty = rm_loss(scores, group, rank, np.zeros_like(valid), num_groups=6)
    assert float(empty[0]) == 0 and float(empty[1]["accuracy"]) == 0


def _trl_dpo(policy, reference, beta):
    """TRL 1.16's own ``DPOTrainer._compute_loss`` (``loss_type="sigmoid"``) on given
    summed log-probs: a stand-in model returns per-token log-probs whose row sums are
    ``policy`` (batch = [chosen..., rejected...]); the reference log-probs are precomputed."""
    import collections
    import types

    import torch
    from trl import DPOTrainer

    n = policy.shape[1]
    length = 4
    logps = torch.zeros(2 * n, length - 1, dtype=torch.float64)
    logps[:, 0] = torch.tensor(np.concatenate(policy))
    outputs = types.SimpleNamespace(
        log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
        is_top1=torch.zeros_like(logps, dtype=torch.bool),
    )  # fmt: skip

    def model(**kwargs):
        return outputs

    model.training = True
    accelerator = types.SimpleNamespace(
        device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    mask = torch.ones(2 * n, length, dtype=torch.long)
    inputs = {
        "input_ids": torch.ones(2 * n, length, dtype=torch.long), "attention_mask": mask,
        "completion_mask": mask, "ref_chosen_logps": torch.tensor(reference[0]),
        "ref_rejected_logps": torch.tensor(reference[1]),
    }  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.slow  # TRL's trainer
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    from oasst_jax.preference_loss import dpo_loss

    rng = np.random.default_rng(7)
    policy = rng.normal(-60, 15, (2, 6))  # [chosen; rejected] summed log-probs
    reference = policy + rng.normal(0, 4, (2, 6))
    want, trl_metrics = _trl_dpo(policy, reference, beta)
    valid = np.ones(6, bool)
    got, metrics = dpo_loss(*policy.astype(np.float32), *reference.astype(np.float32), valid,
                            beta=beta)  # fmt: skip
    assert abs(float(got) - want) < 1e-5, (float(got), want)
    names = {"reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
             "rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
             "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}  # fmt: skip
    for ours, theirs in names.items():
        np.testing.assert_allclose(float(metrics[ours]), trl_metrics[theirs], rtol=1e-5)
    # padding pairs (garbage values) change nothing
    pad = np.concatenate([policy, np.full((2, 3), 1e4)], axis=1).astype(np.float32)
    ref_pad = np.concatenate([reference, np.full((2, 3), -1e4)], axis=1).astype(np.float32)
    padded, _ = dpo_loss(*pad, *ref_pad, np.arange(9) < 6, beta=beta)
    np.testing.assert_allclose(float(padded), float(got), rtol=1e-6)


def test_sequence_logps_equal_a_loop_and_pairs_gather():
    import jax

    from oasst_jax.preference_loss import last_token, pair_values, sequence_logps

    rng = np.random.default_rng(3)
    rows, length, vocab, slots = 3, 10, 11, 5
    logits = rng.normal(0, 3, (rows, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (rows, length))
    weights = rng.integers(0, 2, (rows, length)).astype(np.float32)
    seq = rng.integers(0, slots + 1, (rows, length))  # slots == padding id
    got = jax.jit(sequence_logps, static_argnums=4)(logits, targets, weights, seq, slots)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    want = np.zeros(slots)
    for r in range(rows):
        for t in range(length):
            if seq[r, t] < slots:
                want[seq[r, t]] += weights[r, t] * logp[r, t, targets[r, t]]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    hidden = rng.normal(size=(rows, length, 4))
    np.testing.assert_array_equal(
        last_token(hidden, np.array([2, 0]), np.array([9, 3])), hidden[[2, 0], [9, 3]]
    )
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    group, rank = np.array([1, 0, 1, 0, 0]), np.array([1, 1, 0, 0, 0])
    chosen, rejected, ok = pair_values(values, group, rank, np.array([1, 1, 1, 1, 0]), num_pairs=3)
    np.testing.assert_array_equal(chosen, [4.0, 3.0, 0.0])
    np.testing.assert_array_equal(rejected, [2.0, 1.0, 0.0])
    np.testing.assert_array_equal(ok, [True, True, False])


# ----------------------------------------------------------------------------- rm shards


def _rm_config(out_dir, tokenizer_path, **options):
    from oasst_jax.config import load_config

    cfg = load_config("configs/data/oasst_rm.py")
    cfg.output_dir, cfg.tokenizer_path, cfg.num_workers = str(out_dir), str(tokenizer_path), 1
    cfg.megatron_new_tokens = False  # the tiny models' compact layout (the card's: 32007)
    cfg.datasets.oasst_export.update({"input_file_path": str(RM_FIXTURE), "lang": "en",
                                      "val_split": 0.3, **options})  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory, sp_model_path):
    """The fixture pretokenized with configs/data/oasst_rm.py: ``(out_dir, stats)``."""
    from oasst_jax.cli import pretokenize as pt

    out = tmp_path_factory.mktemp("rm") / "out"
    return out, pt.run(_rm_config(out, sp_model_path))


def test_rm_pretokenize_writes_ranked_shards(rm_data, sp_model_path):
    from oasst_jax.chatml import encode_turns
    from oasst_jax.data import shards
    from oasst_jax.data.splits import dataset_rng, split_parts
    from oasst_jax.tokenizer import Tokenizer

    out, stats = rm_data
    tok = Tokenizer(sp_model_path)
    result = load_oasst_export({"input_file_path": str(RM_FIXTURE), "lang": "en", "mode": "rm"})
    parts = split_parts(
        result.samples, val_split=0.3, max_val_set=None, fraction=1.0,
        rng=dataset_rng(42, "oasst_export"), groups=result.groups, rounding="floor",
    )  # fmt: skip
    assert len(parts.val) and len(parts.train)
    for split, samples in (("train", parts.train), ("val", parts.val)):
        src = shards.RankedDataSource(out / f"oasst_rm-{split}")
        assert len(src) == len(samples) == stats[split][0].accepted
        for i, sample in enumerate(samples):
            ex = src[i]
            tokens, roles = encode_turns(tok, sample.prefix)
            np.testing.assert_array_equal(ex["prefix_tokens"], tokens)
            np.testing.assert_array_equal(ex["prefix_roles"], roles)
            assert len(ex["reply_tokens"]) == len(sample.replies)
            for reply, got, got_roles in zip(sample.replies, ex["reply_tokens"],
                                             ex["reply_roles"], strict=True):  # fmt: skip
                np.testing.assert_array_equal(got, encode_turns(tok, (reply,))[0])
                assert set(got_roles.tolist()) == {2}
            joined = np.concatenate([ex["prefix_tokens"], ex["reply_tokens"][0]])
            assert (
                tok.encode(
                    "".join(
                        f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n"
                        for t in (*sample.prefix, sample.replies[0])
                    )  # fmt: skip
                )
                == joined.tolist()
            )
        block = stats[split][0]
        counts = [len(s.replies) for s in samples]
        line = (f"  Replies per prompt: {sum(counts) / len(counts)} "
                f"(min {min(counts)}, max {max(counts)})")  # fmt: skip
        assert line in block.format()
        meta = shards.read_metadata(out / f"oasst_rm-{split}")
        assert (meta["layout"], meta["num_examples"]) == ("ranked", len(samples))
        assert meta["tokenizer"]["sha256"] == tok.sha256
    report = (out / "stats.md").read_text()
    assert "Replies per prompt: " in report and "too_few_ranked 5" in report
    top = json.loads((out / "metadata.json").read_text())
    assert top["splits"]["train"]["layout"] == "ranked"
    assert sorted(p.name for p in out.iterdir()) == [
        "metadata.json", "oasst_rm-train", "oasst_rm-val", "stats.md"]  # fmt: skip
    with pytest.raises(DataError, match="holds rm examples .* not the 'sft' layout"):
        shards.ShardDataSource(out / "oasst_rm-train")


def test_rm_config_errors(tmp_path, sp_model_path):
    from oasst_jax.data import config as data_config

    cfg = _rm_config(tmp_path / "o", sp_model_path)
    cfg.output_format = "both"
    with pytest.raises(DataError, match="output_format must be 'oasst_jax' in rm mode"):
        data_config.validate_config(cfg)
    cfg = _rm_config(tmp_path / "o", sp_model_path, mode="rl")
    with pytest.raises(DataError, match="datasets.oasst_export.mode must be one of sft, rm"):
        data_config.validate_config(cfg)
    cfg = _rm_config(tmp_path / "o", sp_model_path)
    cfg.min_assistant_tokens = 5
    with pytest.raises(DataError, match="min_assistant_tokens is not supported in rm mode"):
        data_config.validate_config(cfg)
    cfg = _rm_config(tmp_path / "o", sp_model_path)
    cfg.datasets.megacode2 = {"path": "tests/data/megacode2.json"}
    with pytest.raises(DataError, match="datasets.megacode2 is not in rm mode"):
        data_config.validate_config(cfg)
    base = data_config.base_config()
    rm = _rm_config(tmp_path / "o", sp_model_path)
    assert list(rm) == list(base)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- batches


def test_truncate_and_pairs():
    from oasst_jax.data.ranked_batches import make_pairs, truncate

    assert truncate(10, [5, 8], 20, 6) == (10, [5, 8])  # fits: untouched
    assert truncate(10, [5, 15], 20, 6) == (6, [5, 14])  # prefix tail >= 6, reply heads
    assert truncate(10, [5, 12], 20, 6) == (8, [5, 12])  # the replies leave room for 8
    assert truncate(3, [40], 20, 6) == (3, [17])  # a short prefix is kept whole
    assert make_pairs(4, "best_vs_rest", 9) == [(0, 1), (0, 2), (0, 3)]
    assert make_pairs(4, "all", 4) == [(0, 1), (0, 2), (0, 3), (1, 2)]
    assert make_pairs(3, "all", 9) == [(0, 1), (0, 2), (1, 2)]


def _mask(sp_model_path):
    import functools

    from oasst_jax import chatml
    from oasst_jax.tokenizer import Tokenizer

    tok = Tokenizer(sp_model_path)
    return functools.partial(chatml.loss_mask, tokenizer=tok, mode="assistant_answer")


def _epoch(source, cfg, mask):
    from oasst_jax.data.ranked_batches import PreferenceBatches

    return list(PreferenceBatches(source, cfg, mask, repeat=False))


@pytest.mark.parametrize("kind,packing", [("rm", True), ("rm", False), ("dpo", True)])
def test_batches_hold_each_group_once_in_the_documented_layout(
    rm_data, sp_model_path, kind, packing
):
    """Every example's groups appear once per epoch; each valid slot's tokens are its
    prefix tail + reply head, its weights the reply's loss mask on the targets, and the
    summed log-probs of a bigram "model" through the batch fields equal the same sum
    computed on the sequence alone."""
    from oasst_jax.data.ranked_batches import PreferenceConfig, make_pairs, truncate
    from oasst_jax.data.shards import RankedDataSource
    from oasst_jax.preference_loss import last_token, sequence_logps

    source = RankedDataSource(rm_data[0] / "oasst_rm-train")
    mask = _mask(sp_model_path)
    longest = max(len(source[i]["prefix_tokens"]) + max(map(len, source[i]["reply_tokens"]))
                  for i in range(len(source)))  # fmt: skip
    length = longest * 2 // 3  # some groups truncated
    cfg = PreferenceConfig(
        kind=kind, seq_length=length, rows=4, max_sequences=6, max_groups=3, packing=packing,
        max_replies=3, pairs="all", max_pairs_per_prompt=2,
    )  # fmt: skip
    batches = _epoch(source, cfg, mask)
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (400, 400)).astype(np.float32)  # logits[next | token]
    logp_table = table - np.log(np.exp(table.astype(np.float64)).sum(-1, keepdims=True))
    seen, truncated = [], 0
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == {
            **{k: (4, length) for k in ("inputs", "targets", "weights", "segment_ids",
                                        "positions", "sequence_ids")},
            **{k: (6,) for k in ("sequence_row", "sequence_last", "sequence_group",
                                 "sequence_rank", "sequence_reply", "sequence_valid")},
            "group_example": (3,),
        }  # fmt: skip
        assert np.all(b["sequence_ids"][b["segment_ids"] == 0] == 6)
        if not packing:
            assert np.all(np.bincount(b["sequence_row"][b["sequence_valid"]]) <= 1)
        got = sequence_logps(table[b["inputs"]], b["targets"], b["weights"], b["sequence_ids"], 6)
        last_ids = last_token(b["inputs"], b["sequence_row"], b["sequence_last"])
        groups = {}
        for slot in np.flatnonzero(b["sequence_valid"]):
            g, rank = int(b["sequence_group"][slot]), int(b["sequence_rank"][slot])
            groups.setdefault(g, []).append((rank, slot))
        for g, members in groups.items():
            ex_index = int(b["group_example"][g])
            ex = source[ex_index]
            members.sort()
            ranks = [r for r, _ in members]
            if kind == "rm":
                assert ranks == list(range(min(3, len(ex["reply_tokens"]))))
                replies = ranks
            else:
                assert ranks == [0, 1]
                seen_pairs = [p for e, p in seen if e == ex_index]
                replies = make_pairs(len(ex["reply_tokens"]), "all", 2)[len(seen_pairs)]
            seen.append((ex_index, tuple(replies)))
            keep, lens = truncate(len(ex["prefix_tokens"]),
                                  [len(ex["reply_tokens"][i]) for i in replies], length,
                                  length // 2)  # fmt: skip
            truncated += keep < len(ex["prefix_tokens"])
            for (_, slot), i, n in zip(members, replies, lens, strict=True):
                row, cols = (
                    b["sequence_row"][slot],
                    b["sequence_ids"][b["sequence_row"][slot]] == slot,
                )
                reply = ex["reply_tokens"][i]
                want = np.concatenate([ex["prefix_tokens"][len(ex["prefix_tokens"]) - keep:],
                                       reply[:n]])  # fmt: skip
                np.testing.assert_array_equal(b["inputs"][row, cols], want)
                assert np.flatnonzero(cols)[-1] == b["sequence_last"][slot]
                assert last_ids[slot] == want[-1]
                np.testing.assert_array_equal(b["positions"][row, cols], np.arange(len(want)))
                reply_mask = mask(roles=ex["reply_roles"][i], tokens=reply)[:n]
                w = np.concatenate([np.zeros(keep), reply_mask])[1:]
                np.testing.assert_array_equal(b["weights"][row, cols][:-1], w)
                assert b["weights"][row, cols][-1] == 0
                direct = sum(w[t] * logp_table[want[t], want[t + 1]] for t in range(len(want) - 1))
                np.testing.assert_allclose(float(got[slot]), direct, rtol=1e-4, atol=1e-4)
    if kind == "rm":
        assert sorted(e for e, _ in seen) == list(range(len(source)))
    else:
        want = [(e, p) for e in range(len(source))
                for p in make_pairs(len(source[e]["reply_tokens"]), "all", 2)]  # fmt: skip
        assert sorted(seen) == sorted(want)
    assert truncated > 0
    assert (max(int(b["segment_ids"].max()) for b in batches) > 1) == packing


def test_batches_resume_and_refuse_bad_configs(rm_data, sp_model_path):
    from oasst_jax.data.ranked_batches import PreferenceBatches, PreferenceConfig
    from oasst_jax.data.shards import RankedDataSource

    source = RankedDataSource(rm_data[0] / "oasst_rm-train")
    cfg = PreferenceConfig(kind="dpo", seq_length=256, rows=2, max_sequences=4, max_groups=2)
    it = PreferenceBatches(source, cfg, _mask(sp_model_path))
    for _ in range(5):  # past the first epoch
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = PreferenceBatches(source, cfg, _mask(sp_model_path))
    again.set_state(json.loads(json.dumps(state)))
    for a, b in zip(want, [next(again) for _ in range(3)], strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    bad = {"rows": 1, "max_sequences": 1, "max_prefix_length": 256, "kind": "ppo", "pairs": "x"}
    for field, value in bad.items():
        wrong = PreferenceConfig(**{**dataclasses.asdict(cfg), field: value})
        with pytest.raises(DataError, match=field if field != "kind" else "preference kind"):
            PreferenceBatches(source, wrong, _mask(sp_model_path))


# ----------------------------------------------------------------------------- reward export


def test_reward_export_scores_equal_jax(tmp_path):
    """transformers' ``LlamaForSequenceClassification`` scores of the export equal the last
    real token's final normed hidden state (captured from ``Llama.apply``) @ the kernel."""
    import flax.linen as nn
    import jax
    import torch
    import transformers
    from conftest import tiny_llama

    from oasst_jax.hf.reward import export_reward_model
    from oasst_jax.model import Llama

    cfg = tiny_llama(max_position_embeddings=32)
    model = Llama(cfg)
    tokens = np.zeros((1, 8), np.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
    params["score"] = {"kernel": rng.normal(0, 1, (cfg.hidden_size, 1)).astype(np.float32)}
    pad = 0
    export_reward_model(params, cfg, str(tmp_path / "rm"), pad_token_id=pad, dtype="float32")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert (hf.config.num_labels, hf.config.pad_token_id) == (1, pad)
    lengths = [11, 6, 1]
    ids = np.full((3, 11), pad, np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, cfg.vocab_size, n)
    with torch.no_grad():
        got = hf(torch.tensor(ids), attention_mask=torch.tensor(ids != pad)).logits.numpy()

    def is_final_norm(module, method):
        return module.name == "final_norm" and method == "__call__"

    # causal: the hidden state at a sequence's last token ignores the padding after it
    variables = {"params": params}
    _, state = model.apply(variables, ids.astype(np.int32), capture_intermediates=is_final_norm)
    hidden = np.asarray(state["intermediates"]["final_norm"]["__call__"][0])
    want = hidden[np.arange(3), np.array(lengths) - 1] @ params["score"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got).max() > 0.1  # not trivially zero


# ----------------------------------------------------------------------------- training
# rm / dpo through the one train step (oasst_jax/train_step.py) and the loop (train.py).
# Tolerances: fp32 everywhere; sharded vs single device 1e-5 (reduction order differs);
# ours vs TRL / transformers 1e-4 (torch and XLA kernels, summed over ~50 tokens).

SEQ = 64


def _tiny(sp_model_path, **fields):
    from conftest import tiny_llama

    from oasst_jax.tokenizer import Tokenizer

    return tiny_llama(vocab_size=Tokenizer(sp_model_path).vocab_size, max_position_embeddings=SEQ,
                      initializer_range=0.05, **fields)  # fmt: skip


def _micro_batches(rm_data, sp_model_path, kind, n, rows=4):
    from oasst_jax.data.ranked_batches import PreferenceBatches, PreferenceConfig
    from oasst_jax.data.shards import RankedDataSource

    source = RankedDataSource(rm_data[0] / "oasst_rm-train")
    cfg = PreferenceConfig(kind=kind, seq_length=SEQ, rows=rows, max_sequences=8, max_groups=4,
                           max_replies=3, shuffle=False)  # fmt: skip
    it = PreferenceBatches(source, cfg, _mask(sp_model_path))
    return [next(it) for _ in range(n)]


def _trainer(model_cfg, kind, accum, mesh, lr=1e-2, reference="on_the_fly", stages=1):
    from oasst_jax import optim
    from oasst_jax.config import base_config
    from oasst_jax.model import Llama
    from oasst_jax.train_step import StepConfig, build_trainer

    oc = base_config().optim
    oc.lr, oc.min_lr, oc.lr_warmup_iters, oc.weight_decay = lr, lr / 10, 1, 0.0
    beta = 0.1 if kind == "dpo" else 0.001
    sc = StepConfig(accum, 4, pipeline_stages=stages, objective=kind, num_sequences=8,
                    num_groups=4, beta=beta, reference=reference)  # fmt: skip
    rates = np.zeros(model_cfg.num_hidden_layers, np.float32)
    return build_trainer(Llama(model_cfg), optim.make_optimizer(oc, 50), optim.schedule(oc, 50),
                         sc, rates, mesh)  # fmt: skip


def _place(t, stacked):
    return {k: jax_put(stacked[k], s) for k, s in t.batch_sharding.items()}


def jax_put(x, s):
    import jax

    return jax.device_put(np.asarray(x), s)


MESHES = ({}, {"fsdp": 2, "sequence": 2, "tensor": 2}, {"pipeline": 2, "fsdp": 2, "tensor": 2})


_TRAINERS = {}


def _trainer_on(model_cfg, kind, shape):
    """``(trainer, mesh)`` of 2 micro-batches on ``shape`` (``{}``: one device), built once
    per session: tests that use the same one share its traced and compiled programs."""
    import jax

    from oasst_jax import sharding

    key = (model_cfg, kind, tuple(sorted(shape.items())))
    if key not in _TRAINERS:
        mesh = sharding.make_mesh(shape, jax.devices()[:1] if not shape else None)
        with jax.set_mesh(mesh):
            t = _trainer(model_cfg, kind, 2, mesh, stages=shape.get("pipeline", 1))
        _TRAINERS[key] = t, mesh
    return _TRAINERS[key]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rm", "dpo", "rm-lora"])
def test_preference_steps_sharded_equal_single_device(rm_data, sp_model_path, kind):
    """Three steps of 2 stacked micro-batches on one device, on fsdp 2 x sequence 2 x
    tensor 2 and on pipeline 2 x fsdp 2 x tensor 2 (GPipe; DPO's on-the-fly reference
    through the same schedule): same losses, metrics, parameters and val terms (1e-5).
    ``rm-lora`` (one device and the pipeline): a LoRA reward model trains its adapters and
    its new score head, and nothing else; the frozen base stays bit for bit."""
    import jax
    from conftest import max_diff

    from oasst_jax import lora
    from oasst_jax.data.ranked_batches import stack
    from oasst_jax.train_step import reference_params

    objective = kind.removesuffix("-lora")
    adapters = dict(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,down_proj",
                    lora_base_dtype="float32") if kind == "rm-lora" else {}  # fmt: skip
    model_cfg = _tiny(sp_model_path, score_head=objective == "rm", **adapters)
    micro = _micro_batches(rm_data, sp_model_path, objective, 2)
    batch = stack(micro)
    meshes = MESHES[::2] if adapters else MESHES
    out = []
    for shape in meshes:
        t, mesh = _trainer_on(model_cfg, objective, shape)
        with jax.set_mesh(mesh):
            state = t.init_random(jax.random.key(0))
            fresh = jax.device_get(state)
            ms = []
            for _ in range(3):  # the first update is 0 (warm-up starts at lr 0)
                state, m = t.step(state, _place(t, batch))
                ms.append({k: float(v) for k, v in m.items()})
            ref = reference_params(state, t.step_cfg)
            val = t.eval(t.eval_params(state), _place_eval(t, micro[1]), ref)
            out.append((ms, jax.device_get(state["params"]), jax.device_get(val)))
        if adapters:
            paths = [tuple(k.key for k in p)
                     for p, _ in jax.tree_util.tree_leaves_with_path(out[-1][1])]  # fmt: skip
            others = [p for p in paths if p != lora.SCORE_HEAD]
            assert len(others) < len(paths) and others
            assert all(p[-1].endswith(lora.ADAPTER_SUFFIXES) for p in others), paths
            assert max_diff(fresh["frozen"], jax.device_get(state["frozen"])) == 0.0
            moved = out[-1][1]["score"]["kernel"] - fresh["params"]["score"]["kernel"]
            assert np.abs(moved).max() > 1e-4
    m1, p1, v1 = out[0]
    for shape, (m8, p8, v8) in zip(meshes[1:], out[1:], strict=True):
        for a, b in zip(m1, m8, strict=True):
            for k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (shape, k, a[k], b[k])
        assert max_diff(p1, p8) < 1e-5, shape
        for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v8), strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (shape, a, b)  # log-probs ~ -250
    key = "num_prompts" if objective == "rm" else "num_pairs"
    assert m1[0][key] == float((batch["group_example"] >= 0).sum())  # every group counted
    if objective == "rm":
        assert "score" in p1 and m1[2]["loss"] < m1[0]["loss"]


def _hf_logps(params, model_cfg, out_dir, b):
    """Per-slot summed reply log-probs of ``b`` under ``params`` exported to a HF
    ``LlamaForCausalLM`` (each sequence run alone): ``{slot: logp}``."""
    import torch
    import transformers

    from oasst_jax.hf.convert import write_hf_dir
    from oasst_jax.hf.reward import TreeReader

    write_hf_dir(TreeReader(params), model_cfg, None, str(out_dir), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    out = {}
    for slot in np.flatnonzero(b["sequence_valid"]):
        row = b["sequence_row"][slot]
        cols = b["sequence_ids"][row] == slot
        ids, w = b["inputs"][row, cols], b["weights"][row, cols]
        with torch.no_grad():
            logits = hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
        logp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]].numpy()
        out[int(slot)] = float((logp * w[:-1]).sum())
    return out


@pytest.mark.slow  # TRL's trainer on torch beside ours (~10 s on 2 cores)
def test_dpo_step_equals_trl_and_raises_reward_accuracy(rm_data, sp_model_path, tmp_path):
    """A tiny DPO run (policy and on-the-fly reference from one random init, at most 12
    steps on the 4 training pairs): from a tie on every pair (policy = reference) to
    reward accuracy 1;
    our loss on a micro-batch equals TRL's sigmoid loss (its own ``_compute_loss``) on log-
    probs that transformers computes from the exported policy and reference (1e-4).  (The
    one-device trainer of the sharded-step test: its step and eval are compiled once.)"""
    import jax

    from oasst_jax.data.ranked_batches import stack
    from oasst_jax.objectives import finish_metrics

    model_cfg = _tiny(sp_model_path)
    micro = _micro_batches(rm_data, sp_model_path, "dpo", 2)
    batch = stack(micro)
    t, mesh = _trainer_on(model_cfg, "dpo", {})
    with jax.set_mesh(mesh):
        state = t.init_random(jax.random.key(1))

        def evaluate(state):
            terms = [t.eval(state["params"], _place_eval(t, b), state["reference"]) for b in micro]
            num, sums = jax.tree.map(lambda *x: sum(np.float64(v) for v in x), *terms)
            return {k: float(v) for k, v in finish_metrics(num, sums, t.step_cfg).items()}

        before = evaluate(state)
        after, steps = before, 0
        while after["reward_accuracy"] < 1 and steps < 12:  # lr 1e-2: a few steps
            state, _ = t.step(state, _place(t, batch))
            after, steps = evaluate(state), steps + 1
        num, sums = t.eval(state["params"], _place_eval(t, micro[0]), state["reference"])
        ours = float(num) / float(sums["den"])
    # policy = reference: every pair ties (margin 0 up to float noise, which alone would
    # decide ``chosen > rejected``); after training every pair is ranked right
    assert abs(before["reward_margin"]) < 1e-5 and after["reward_accuracy"] == 1, (before, after)
    assert after["num_pairs"] == 4 and after["loss"] < before["loss"] == pytest.approx(np.log(2))
    params, reference = jax.device_get((state["params"], state["reference"]))
    b = micro[0]
    pol = _hf_logps(params, model_cfg, tmp_path / "policy", b)
    ref = _hf_logps(reference, model_cfg, tmp_path / "reference", b)
    pairs = sorted({int(g) for g in b["sequence_group"][b["sequence_valid"]]})

    def by_rank(values):
        slot = {(int(b["sequence_group"][s]), int(b["sequence_rank"][s])): s for s in values}
        return np.array([[values[slot[(g, r)]] for g in pairs] for r in (0, 1)])

    want, _ = _trl_dpo(by_rank(pol), by_rank(ref), 0.1)
    print(
        f"dpo: accuracy {before['reward_accuracy']} -> {after['reward_accuracy']}, loss "
        f"{before['loss']:.4f} -> {after['loss']:.4f} in {steps} steps; ours {ours:.6f} "
        f"trl {want:.6f}"
    )
    assert abs(ours - want) < 1e-4, (ours, want)
    assert abs(want - np.log(2)) > 1e-3  # the policy has moved
    assert want > 1e-2  # ... not so far that 1e-4 would be a loose check of the loss


def _place_eval(t, b):
    from oasst_jax.objectives import batch_shardings

    mesh = next(iter(t.batch_sharding.values())).mesh
    return {k: jax_put(b[k], s) for k, s in batch_shardings(mesh, t.step_cfg).items()}


def _run_cfg(rm_data, sp_model_path, workdir, objective, **overrides):
    import os

    from oasst_jax.config import load_config
    from oasst_jax.tokenizer import Tokenizer

    cfg = load_config(os.path.join("configs", f"tiny_{objective}.py"))
    cfg.data_path, cfg.tokenizer_path, cfg.workdir = str(rm_data[0]), str(sp_model_path), str(
        workdir)  # fmt: skip
    cfg.model.update(vocab_size=Tokenizer(sp_model_path).vocab_size, hidden_size=32,
                     intermediate_size=64, num_hidden_layers=2,
                     max_position_embeddings=SEQ)  # fmt: skip
    cfg.seq_length, cfg.global_batch_size, cfg.micro_batch_size = SEQ, 16, 4
    cfg.train_iters, cfg.save_interval, cfg.eval_interval, cfg.eval_iters = 4, 2, 2, 1
    cfg.log_interval, cfg.eval_prompts, cfg.optim.lr_warmup_iters = 1, "", 1
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return {m["step"]: m for m in map(json.loads, f)}


@pytest.fixture(scope="module")
def lm_ckpt(rm_data, sp_model_path, tmp_path_factory):
    """A language model's checkpoints (one step of a DPO run: no score head), the base
    that rm runs start from.  (A 3-step run stopped after step 1: the step program of
    test_dpo_precomputed_reference_equals_on_the_fly's on-the-fly run, compiled once.)"""
    from oasst_jax.cli import train

    lm = tmp_path_factory.mktemp("lm")
    train.run(_run_cfg(rm_data, sp_model_path, lm, "dpo", train_iters=3, exit_interval=1,
                       eval_interval=0))  # fmt: skip
    return lm / "checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_rm_run_resumes_bit_exactly_and_its_hf_export_scores_the_same(
    rm_data, sp_model_path, lm_ckpt, tmp_path, rank
):
    """configs/tiny_rm.py (smaller model) from a language model's checkpoint for 4 steps in
    one go, and resumed from that run's step-2 checkpoint (alone in a new workdir):
    identical metrics (train and val) and weights.  ``convert rm-to-hf`` of the
    result: transformers' LlamaForSequenceClassification scores equal ours (1e-4).  With
    ``lora.rank`` over that checkpoint (the frozen base): the checkpoints hold the
    adapters and the score head only, the head moves, and the export merges the adapters
    into that base (ours: the LoRA model on base + trained leaves)."""
    import jax
    import torch
    import transformers

    from oasst_jax import checkpoint, lora
    from oasst_jax.cli import convert, train
    from oasst_jax.model import Llama

    def config(workdir, **overrides):
        # both from the language model: the full run's start is
        # test_rm_starts_from_a_language_model_with_a_fresh_score_head's (one compile)
        extra = {"load": str(lm_ckpt)} if rank else {"load": str(lm_ckpt), "finetune": True}
        cfg = _run_cfg(rm_data, sp_model_path, workdir, "rm", **extra, **overrides)
        cfg.lora.update(LORA if rank else {})
        return cfg

    one, two = tmp_path / "one", tmp_path / "two"
    train.run(config(one))
    # (stopping after 2 steps saves what the uninterrupted run saves at step 2; that
    # exit_interval stops there is tests/test_cli_train.py's)
    shutil.copytree(one / "checkpoints" / "2", two / "checkpoints" / "2")
    train.run(config(two))
    assert sorted(_rows(two)) == [3, 4]  # it resumed at step 2
    a, b = _rows(one), _rows(two)
    drop = ("step_time", "tokens_per_s", "mfu")
    for step in (3, 4):
        assert {k: v for k, v in a[step].items() if k not in drop and not k.startswith("time_")
                } == {k: v for k, v in b[step].items() if k not in drop and not k.startswith(
                    "time_")}  # fmt: skip
    assert {"accuracy", "margin", "num_prompts", "val_accuracy", "val_margin"} <= set(a[4])
    pa = checkpoint.load_weights(str(one / "checkpoints"))
    pb = checkpoint.load_weights(str(two / "checkpoints"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb),
                                                      strict=True))  # fmt: skip
    params = pa
    if rank:
        paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(pa)]
        others = [p for p in paths if p != lora.SCORE_HEAD]
        assert len(others) == len(paths) - 1
        assert all(p[-1].endswith(lora.ADAPTER_SUFFIXES) for p in others), paths
        at2 = checkpoint.load_weights(str(one / "checkpoints"), step=2)["score"]["kernel"]
        assert np.abs(pa["score"]["kernel"] - at2).max() > 1e-4
        params = lora.merge(pa, checkpoint.load_weights(str(lm_ckpt)))
        with pytest.raises(SystemExit, match="is a LoRA reward model .* rm-to-hf"):
            convert.main(["lora-to-peft", "--ckpt", str(one / "checkpoints"),
                          "--out", str(tmp_path / "peft")])  # fmt: skip
        assert not (tmp_path / "peft").exists()

    out = tmp_path / "rm_hf"
    convert.main(["rm-to-hf", "--ckpt", str(one / "checkpoints"), "--out", str(out),
                  "--dtype", "float32", "--tokenizer", str(sp_model_path)])  # fmt: skip
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    cfg = checkpoint.load_model_config(str(one / "checkpoints"))
    b = _micro_batches(rm_data, sp_model_path, "rm", 1)[0]
    seqs = [b["inputs"][b["sequence_row"][s], b["sequence_ids"][b["sequence_row"][s]] == s]
            for s in np.flatnonzero(b["sequence_valid"])]  # fmt: skip
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = q
    assert all(q[-1] != 0 for q in seqs)  # no sequence ends on the pad id
    with torch.no_grad():
        got = hf(torch.tensor(ids), attention_mask=torch.tensor(ids != 0)).logits.numpy()[:, 0]
    model = Llama(cfg)
    hidden = model.apply({"params": params}, ids.astype(np.int32), method=Llama.hidden)
    last = hidden[np.arange(len(seqs)), [len(q) - 1 for q in seqs]]
    want = np.asarray(model.apply({"params": params}, last, method=Llama.scores))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.ptp(want) > 1e-3  # trained scores differ between replies


LORA = {"rank": 4, "alpha": 8.0, "base_dtype": "float32"}


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_dpo_precomputed_reference_equals_on_the_fly(rm_data, sp_model_path, tmp_path, rank):
    """The reference pre-pass (reference_logps.json) trains exactly as the on-the-fly
    reference (1e-5); a run whose data settings changed refuses the stored table.  With
    ``lora.rank`` (a random base): the reference is the base with the adapters zeroed, on
    the fly and in the pre-pass; the reward margin rises from a tie (policy = reference) and the
    checkpoint holds only the adapters."""
    import jax

    from oasst_jax import checkpoint, lora
    from oasst_jax.cli import train
    from oasst_jax.turns import DataError

    def config(workdir):
        cfg = _run_cfg(rm_data, sp_model_path, workdir, "dpo", train_iters=3, save_interval=0)
        cfg.lora.update(LORA if rank else {})
        return cfg

    fly, pre = tmp_path / "fly", tmp_path / "pre"
    train.run(config(fly))
    cfg = config(pre)
    cfg.dpo.reference = "precomputed"
    train.run(cfg)
    assert (pre / "reference_logps.json").is_file()
    a, b = _rows(fly), _rows(pre)
    assert a[1]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    for step in (1, 2, 3):
        for k in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "val_loss"):
            if k in a[step]:
                assert a[step][k] == pytest.approx(b[step][k], abs=1e-5), (step, k)
    if rank:
        print("lora dpo reward accuracy / margin:",
              [(a[s]["reward_accuracy"], a[s]["reward_margin"]) for s in (1, 2, 3)])  # fmt: skip
        # Step 1 (policy = reference) is a tie on every pair: its margin is 0 up to float
        # noise between the policy's and the reference's differently compiled programs, and
        # that noise alone decides ``chosen > rejected``, so step 1's accuracy is no signal.
        assert abs(a[1]["reward_margin"]) < 1e-5
        assert a[3]["reward_margin"] > 1e-3 and a[3]["reward_accuracy"] > 0.5, a[3]
        saved = checkpoint.load_weights(str(pre / "checkpoints"))
        paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)]
        assert paths and all(p[-1].endswith(lora.ADAPTER_SUFFIXES) for p in paths), paths
        return
    cfg.dpo.max_pairs_per_prompt, cfg.train_iters = 1, 4
    with pytest.raises(DataError, match="dpo.max_pairs_per_prompt=4"):
        train.run(cfg)


@pytest.mark.slow
def test_rm_starts_from_a_language_model_with_a_fresh_score_head(
    rm_data, sp_model_path, lm_ckpt, tmp_path
):
    """``load=`` a checkpoint without a score head (an SFT/DPO run's): the trunk is read,
    the head drawn from the seed; step 1's update is 0 (warm-up), so the saved trunk is the
    loaded one bit for bit."""
    import jax

    from oasst_jax import checkpoint
    from oasst_jax.cli import train

    rm = tmp_path / "rm"
    # (4 steps stopped after 1: the step program of the rm resume test, compiled once)
    train.run(_run_cfg(rm_data, sp_model_path, rm, "rm", train_iters=4, exit_interval=1,
                       eval_interval=0, load=str(lm_ckpt), finetune=True))  # fmt: skip
    base, got = (checkpoint.load_weights(str(d)) for d in (lm_ckpt, rm / "checkpoints"))
    score = got.pop("score")["kernel"]
    assert jax.tree.all(jax.tree.map(np.array_equal, base, got))
    assert score.shape == (32, 1) and 0 < np.std(score) < 0.1


@pytest.mark.parametrize(
    "text",
    [
        '{"identity": {}, "splits": {"train": {"keys": [[0, 0, 1',  # truncated
        "[1, 2]",  # not the object save_reference writes
        '{"identity": {}, "splits": {"train": {"keys": [[0, 0, 1, 0]], "logps": ["x"]}}}',
    ],
)
def test_damaged_reference_file_is_one_line_saying_to_delete_it(tmp_path, text):
    from oasst_jax.data import ranked_batches as pref_data

    path = tmp_path / pref_data.REFERENCE_FILE
    path.write_text(text)
    with pytest.raises(DataError) as err:
        pref_data.load_reference(str(path), {})
    line = str(err.value)
    assert line.startswith(f"{path} is damaged (") and "\n" not in line
    assert line.endswith("; delete it to recompute the reference log-probs")
