"""``oasst_jax.evaluate``: our lm-eval model answers what lm-eval's ``hf`` model answers
on the same weights exported to a Hugging Face directory (fp32), request by request."""

from __future__ import annotations

import json
import os
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_llama
from flax import linen as nn

from oasst_jax import checkpoint
from oasst_jax.cli import convert, evaluate
from oasst_jax.model import Llama
from oasst_jax.tokenizer import Tokenizer

# lm-eval (with datasets, ~2 s) is imported where it is used: every xdist worker collects
# this file, and only the one that runs it needs lm-eval
if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

TASKS = os.path.join(REPO, "tests", "data", "eval_tasks")
# fp32 sums of up to ~130 log-probabilities; XLA and torch differ in summation order
LOGLIK_ATOL = 2e-4
WORDS = "the quick brown fox jumps over the lazy dog while a helpful assistant answers".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory, sp_model_path):
    """A random tiny checkpoint (hidden 64, 2 layers, vocab 302 padded to 384), its HF
    export, and both as lm-eval models: ours sharded fsdp 2 x tensor 2 (x data 2)."""
    from lm_eval.models.huggingface import HFLM

    tok = Tokenizer(sp_model_path)
    cfg = tiny_llama(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    params = nn.meta.unbox(
        jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    root = tmp_path_factory.mktemp("eval")
    ckpt, hf_dir = str(root / "ckpt"), str(root / "hf")
    checkpoint.save_weights(ckpt, params, cfg)
    convert.main(
        ["orbax-to-hf", "--ckpt", ckpt, "--out", hf_dir, "--dtype", "float32"]
        + ["--tokenizer", str(sp_model_path)]
    )
    ours = evaluate.OasstJaxLM(ckpt, str(sp_model_path), batch_size=4, tensor=2, fsdp=2)
    hf = HFLM(pretrained=hf_dir, dtype="float32", batch_size=4, device="cpu")
    return {"ours": ours, "hf": hf, "ckpt": ckpt, "tok": sp_model_path}


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _text(n: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def test_loglikelihood_equals_hf(models):
    ours = models["ours"]
    chat = ours.apply_chat_template([{"role": "user", "content": "hello world"}])
    pairs = [
        ("the quick brown", " fox"),
        ("", "the lazy dog"),  # empty context: conditioned on BOS
        ("a helpful assistant ", "answers"),  # the trailing space moves to the continuation
        (_text(150, 1), " the quick brown fox"),  # longer than the context: left-truncated
        (chat, "the quick brown fox jumps"),  # chatml, special ids inside
        ("the", " quick"),
    ]
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = models["hf"].loglikelihood(_requests("loglikelihood", pairs))
    diffs = [abs(a[0] - b[0]) for a, b in zip(got, want, strict=True)]
    print(f"loglikelihood max abs diff vs hf: {max(diffs):.2e}")
    assert max(diffs) < LOGLIK_ATOL, (got, want)
    assert [g for _, g in got] == [g for _, g in want]
    assert all(lp < 0 for lp, _ in got)


def test_loglikelihood_rolling_equals_hf(models):
    texts = [(_text(12, 0),), (_text(300, 2),)]  # the second spans several 128-token windows
    got = models["ours"].loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    want = models["hf"].loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print(f"rolling max abs diff vs hf: {diff:.2e}")
    assert got == pytest.approx(want, abs=1e-3)
    assert got[1] < got[0] < 0


def test_generate_until_greedy_equals_hf(models, monkeypatch):
    """Same continuations, cut at the same stop strings.  Both sides turn ids into text
    with our tokenizer: a random model emits byte pieces that are not valid UTF-8, which
    SentencePiece decodes byte by byte as UTF-8 does ("\xf2K" -> "\ufffdK") but HF's
    ByteFallback decoder turns a whole invalid run into one "\ufffd" per byte."""
    ours, hf = models["ours"], models["hf"]
    hf_decode = hf.tok_decode

    def hf_tok_decode(ids, skip_special_tokens=True):
        return ours.tok_decode(ids) if skip_special_tokens else hf_decode(ids, False)

    monkeypatch.setattr(hf, "tok_decode", hf_tok_decode)
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    texts = ("the quick brown fox", _text(30, 3), chat)
    prompts = [(p, {"until": ["lazy"], "max_gen_toks": 16, "do_sample": False}) for p in texts]
    prompts += [(p, {"until": ["w"], "max_gen_toks": 16}) for p in texts]  # cut early
    got = ours.generate_until(_requests("generate_until", prompts))
    want = hf.generate_until(_requests("generate_until", prompts))
    assert got == want
    cut = [len(a) < len(b) for a, b in zip(got[3:], got[:3], strict=True)]
    assert all(got[:3]) and any(cut)


def test_chat_template_is_the_exported_tokenizers(models):
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for add in (True, False):
        assert models["ours"].apply_chat_template(history, add) == models["hf"].apply_chat_template(
            history, add
        )


def test_cli_multiple_choice_accuracy_equals_hf(models, tmp_path, monkeypatch, capsys):
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    out = tmp_path / "results.json"
    evaluate.main(
        ["--ckpt", models["ckpt"], "--tokenizer", str(models["tok"]), "--tasks", "oasst_tiny_mc"]
        + ["--include-path", TASKS, "--out", str(out), "--batch-size", "4", "--log-samples"]
        + ["--tensor", "2", "--fsdp", "2"]
    )
    ours = json.loads(out.read_text())
    assert "oasst_tiny_mc" in capsys.readouterr().out
    hf = lm_eval.simple_evaluate(
        model=models["hf"],
        tasks=["oasst_tiny_mc"],
        task_manager=TaskManager(include_path=TASKS, include_defaults=False),
        log_samples=True,
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["oasst_tiny_mc"][metric] == hf["results"]["oasst_tiny_mc"][metric]
    accuracy = [r["results"]["oasst_tiny_mc"]["acc,none"] for r in (ours, hf)]
    print("accuracy ours / hf:", accuracy)
    ours_ll = [r[0] for s in ours["samples"]["oasst_tiny_mc"] for r in s["filtered_resps"]]
    hf_ll = [float(r[0]) for s in hf["samples"]["oasst_tiny_mc"] for r in s["filtered_resps"]]
    assert ours_ll == pytest.approx(hf_ll, abs=LOGLIK_ATOL)
    assert ours["config"]["model"] == "oasst_jax" and ours["n-samples"]["oasst_tiny_mc"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ckpt", "/nonexistent/ckpt", "--tasks", "oasst_tiny_mc"], "no such checkpoint"),
        (["--tasks", "no_such_task"], "unknown task(s) no_such_task"),
    ],
)
def test_bad_input_is_one_line(models, tmp_path, monkeypatch, flags, message):
    from lm_eval.tasks import TaskManager

    # lm-eval's ~15k built-in tasks are indexed when a name is not in --include-path;
    # the error line is the same without them, which keeps the test fast
    monkeypatch.setattr("lm_eval.tasks.TaskManager", partial(TaskManager, include_defaults=False))
    argv = ["--ckpt", models["ckpt"], "--include-path", TASKS, "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + flags)
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "r.json").exists()


def test_length_buckets_are_few():
    buckets = [evaluate.length_bucket(n, 4096) for n in (1, 32, 33, 100, 4000)]
    assert buckets == [32, 32, 64, 128, 4096]
    assert evaluate.length_bucket(120, 100) == 128  # the context rounded up to 32


def test_results_are_strict_json():
    results = {"acc,none": np.float32(0.5), "stderr": float("nan"), "n": np.int64(3)}
    results.update(tags={"x"}, rows=[float("inf"), np.bool_(True)], dtype=np.dtype("f4"))
    safe = json.loads(json.dumps(evaluate.json_safe(results), allow_nan=False))
    assert safe == {"acc,none": 0.5, "stderr": None, "n": 3, "tags": ["x"],
                    "rows": [None, True], "dtype": "float32"}  # fmt: skip
