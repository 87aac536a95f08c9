"""Regenerate the checked-in dataset fixtures in the upstream formats (deterministic).

    .venv/bin/python tests/data/make_fixtures.py

Writes, next to this script: ``megacode2.json`` (JSON array, columns USER/ASSISTANT),
``orca-chat-gpt4.json`` (JSON array of {instruction, conversation: [{input, output}]}),
``dolly15k/data/{en,de,es,fr}-00000-of-00001.parquet`` (the hub's parquet layout),
``oa_leet10k.parquet`` and ``oa_leet10k.jsonl`` (same rows, INSTRUCTION/RESPONSE/SOURCE),
``oasst_export.jsonl.gz`` and ``oasst_ready.tar.gz`` (the same message-tree lines; the tar
holds ``2023-07-23_oasst_ready/2023-07-23_oasst_ready.trees.jsonl.gz``).

Texts are synthetic but multi-sentence and varied (four languages, prose and code) so that
samples exceed ~25 tokens of a small tokenizer and a sentencepiece model can be trained on
them.  The special records (empty sides, refusals, malformed lines, the oasst tree shapes)
are listed where they are built; ``tests/test_sources.py`` derives its expected counts
from these comments.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REFUSAL = "As an AI language model, I cannot help with that request."

WORDS = {
    "en": {
        "subj": "the river delta|a binary search tree|the solar panel|the medieval library|"
        "a sourdough starter|the city council|the garbage collector|a hash table|the glacier|"
        "the violin maker|a cargo ship|the compiler|the honeybee colony|a neural network|"
        "the lighthouse keeper|the spreadsheet|the volcano|a chess engine|the orchestra|"
        "the vaccine trial".split("|"),
        "verb": "stores|reflects|connects|balances|protects|measures|transforms|organizes|"
        "predicts|shelters|compresses|feeds|schedules|explains|filters".split("|"),
        "obj": "fresh water for the farms|every incoming request|the morning light|"
        "old manuscripts|wild yeast and bacteria|the annual budget|unused memory|"
        "key and value pairs|ancient layers of ice|spruce and maple wood|containers of grain|"
        "source code into machine instructions|pollen from nearby meadows|noisy sensor data|"
        "ships along the rocky coast|quarterly sales figures".split("|"),
        "clause": "because the whole system depends on it|which keeps the process fast and "
        "predictable|although the details vary from place to place|so that nothing is wasted|"
        "while the surrounding conditions keep changing|as engineers have known for decades|"
        "which surprises many beginners|even when resources are scarce|and this is why "
        "careful planning matters|unless something unexpected happens".split("|"),
        "ask": "Can you explain how {s} {v} {o}?|Why is it important that {s} {v} {o}?|"
        "Write a short paragraph about how {s} {v} {o}.|What happens when {s} {v} {o}?|"
        "Give me three facts about {s}.|Summarize the role of {s} in simple words.".split("|"),
    },
    "de": {
        "subj": "der Fluss|die Bibliothek|das Sonnenkraftwerk|der Bäcker|die Stadtverwaltung|"
        "das Orchester|der Gletscher|die Honigbiene|der Leuchtturm|das Containerschiff".split("|"),
        "verb": "speichert|schützt|verbindet|misst|verwandelt|ordnet|erklärt|versorgt".split("|"),
        "obj": "frisches Wasser für die Felder|alte Handschriften|das morgendliche Licht|"
        "den jährlichen Haushalt|Schichten aus uraltem Eis|Körner aus dem Süden|"
        "die Daten der Sensoren|die Schiffe an der Küste".split("|"),
        "clause": "weil das ganze System davon abhängt|was viele Anfänger überrascht|"
        "obwohl sich die Bedingungen ständig ändern|damit nichts verschwendet wird|"
        "wie Fachleute seit Jahrzehnten wissen".split("|"),
        "ask": "Kannst du erklären, warum {s} {o} {v}?|Was passiert, wenn {s} {o} {v}?|"
        "Beschreibe kurz, wie {s} {o} {v}.".split("|"),
    },
    "es": {
        "subj": "el río|la biblioteca|el panel solar|el panadero|el ayuntamiento|la orquesta|"
        "el glaciar|la abeja|el faro|el barco de carga".split("|"),
        "verb": "almacena|protege|conecta|mide|transforma|organiza|explica|alimenta".split("|"),
        "obj": "agua fresca para los campos|manuscritos antiguos|la luz de la mañana|"
        "el presupuesto anual|capas de hielo muy antiguo|granos del sur|los datos de los "
        "sensores|los barcos de la costa".split("|"),
        "clause": "porque todo el sistema depende de ello|lo que sorprende a muchos "
        "principiantes|aunque las condiciones cambian sin parar|para que nada se desperdicie|"
        "como saben los expertos desde hace décadas".split("|"),
        "ask": "¿Puedes explicar por qué {s} {v} {o}?|¿Qué ocurre cuando {s} {v} {o}?|"
        "Describe brevemente cómo {s} {v} {o}.".split("|"),
    },
    "fr": {
        "subj": "le fleuve|la bibliothèque|le panneau solaire|le boulanger|la mairie|"
        "l'orchestre|le glacier|l'abeille|le phare|le cargo".split("|"),
        "verb": "stocke|protège|relie|mesure|transforme|organise|explique|nourrit".split("|"),
        "obj": "l'eau douce des champs|des manuscrits anciens|la lumière du matin|"
        "le budget annuel|des couches de glace très anciennes|des céréales du sud|les données "
        "des capteurs|les navires de la côte".split("|"),
        "clause": "parce que tout le système en dépend|ce qui surprend beaucoup de débutants|"
        "bien que les conditions changent sans cesse|afin que rien ne soit gaspillé|comme "
        "les experts le savent depuis des décennies".split("|"),
        "ask": "Peux-tu expliquer pourquoi {s} {v} {o} ?|Que se passe-t-il quand {s} {v} {o} ?|"
        "Décris brièvement comment {s} {v} {o}.".split("|"),
    },
}
WORDS["ja"] = {
    "subj": "川|図書館|太陽光パネル|パン職人|市役所|氷河|ミツバチ|灯台".split("|"),
    "verb": "守る|集める|測る|運ぶ|説明する|整理する".split("|"),
    "obj": "冷たい水|古い写本|朝の光|毎年の予算|花の蜜|海岸の船".split("|"),
    "clause": "多くの人が驚く|仕組み全体がそれに依存している|条件は毎日変わる".split("|"),
    "ask": "{s}はなぜ{o}を{v}のですか？|{s}が{o}を{v}と何が起きますか？".split("|"),
    "say": "{s}は{o}を{v}。{c}。",
}
for _lang in ("en", "de", "es", "fr"):
    WORDS[_lang]["say"] = "{s} {v} {o}, {c}."
CODE_NAMES = (
    "parse_config|merge_intervals|count_words|rotate_matrix|find_duplicates|"
    "flatten_tree|moving_average|validate_email|top_k_frequent|binary_search"
).split("|")


def sentence(rng: random.Random, lang: str) -> str:
    w = WORDS[lang]
    s = w["say"].format(
        s=rng.choice(w["subj"]),
        v=rng.choice(w["verb"]),
        o=rng.choice(w["obj"]),
        c=rng.choice(w["clause"]),
    )
    return s[0].upper() + s[1:]


def paragraph(rng: random.Random, lang: str, lo: int = 3, hi: int = 5) -> str:
    return " ".join(sentence(rng, lang) for _ in range(rng.randint(lo, hi)))


def question(rng: random.Random, lang: str) -> str:
    w = WORDS[lang]
    q = rng.choice(w["ask"]).format(
        s=rng.choice(w["subj"]), v=rng.choice(w["verb"]), o=rng.choice(w["obj"])
    )
    return q[0].upper() + q[1:]


def code_answer(rng: random.Random, name: str) -> str:
    arg = rng.choice(["items", "values", "text", "grid", "numbers"])
    n = rng.randint(2, 9)
    return (
        f"Here is one way to write `{name}` in Python:\n\n```python\n"
        f"def {name}({arg}, limit={n}):\n"
        f'    """Process {arg} and keep at most {n} results."""\n'
        f"    result = []\n"
        f"    for index, item in enumerate({arg}):\n"
        f"        if index >= limit:\n"
        f"            break\n"
        f"        result.append(item)\n"
        f"    return result\n```\n\n"
        f"The loop stops after {n} elements, so it runs in linear time. " + sentence(rng, "en")
    )


def code_question(rng: random.Random, name: str) -> str:
    return (
        f"Write a Python function `{name}` that takes a list and returns a filtered copy. "
        f"Explain the time complexity of your solution."
    )


def megacode2(rng: random.Random) -> list[dict]:
    """40 rows.  Special: row 3 USER "" (empty_text), row 7 ASSISTANT "   " (empty_text),
    row 11 no ASSISTANT key (missing_field), row 15 USER null (missing_field), rows 20 and
    31 canned refusals in the answer, row 25 a refusal phrase in the question only
    (phrase_filter under upstream's list), row 1's code answer quotes ``</s>`` and ``<s>``.
    36 rows pass the empty/missing checks, 33 the refusal filter too."""
    rows = []
    for i in range(40):
        name = CODE_NAMES[i % len(CODE_NAMES)]
        if i % 2:
            row = {"USER": code_question(rng, name), "ASSISTANT": code_answer(rng, name)}
        else:
            row = {"USER": question(rng, "en"), "ASSISTANT": paragraph(rng, "en")}
        rows.append(row)
    rows[3]["USER"] = ""
    rows[7]["ASSISTANT"] = "   "
    del rows[11]["ASSISTANT"]
    rows[15]["USER"] = None
    rows[20]["ASSISTANT"] = REFUSAL
    rows[31]["ASSISTANT"] = "I'm sorry, but as an AI Language Model I cannot write that code."
    rows[25]["USER"] = "Given my knowledge CUTOFF in 2021, " + rows[25]["USER"]
    rows[1]["ASSISTANT"] += '\n\nA tokenizer marks the ends with `bos = "<s>"` and `eos = "</s>"`.'
    return rows


def orca_chat(rng: random.Random) -> list[dict]:
    """30 records with 1-3 exchanges; every third has an empty instruction (no system
    turn); record 29 has an exchange without ``output`` (missing_field).  29 usable.
    Empty turns, kept as upstream: record 5's instruction is one space (a system turn),
    record 4's first input and record 7's last output are "" (empty turns), record 10
    has a refusal phrase (orca-chat has no phrase filter)."""
    records = []
    for i in range(30):
        instruction = "" if i % 3 == 0 else f"You are an AI assistant. {sentence(rng, 'en')}"
        exchanges = [
            {"input": question(rng, "en"), "output": paragraph(rng, "en")} for _ in range(1 + i % 3)
        ]
        records.append({"instruction": instruction, "conversation": exchanges})
    del records[29]["conversation"][0]["output"]
    records[5]["instruction"] = " "
    records[4]["conversation"][0]["input"] = ""
    records[7]["conversation"][-1]["output"] = ""
    records[10]["conversation"][0]["output"] = REFUSAL
    return records


def dolly(rng: random.Random, lang: str) -> list[dict]:
    """10 rows per split.  Contexts: rows 0-3 empty, rows 4-8 with citation markers (every
    form upstream removes, ``[1]``, ``[1, 2]``, ``[a]``, ``[A]``, ``[citation needed]``, and
    ``[ 1 ]``/``[12-14]``, which it keeps), row 9 of markers only (cleans to one space:
    still a context turn upstream).  In the ``de`` split row 2 has an empty response
    (empty_text) and row 3 a whitespace-only instruction (kept upstream); in ``es`` row 1
    has a refusal phrase in the instruction, in ``fr`` row 6 in the response
    (phrase_filter).  39 rows pass the empty check, 37 the refusal filter too."""
    markers = ["[1]", "[1, 2]", "[a]", "[citation needed]", "[12][A] [ 1 ] [12-14]"]
    rows = []
    for i in range(10):
        if i < 4:
            context = ""
        elif i < 9:
            a, b = sentence(rng, lang), sentence(rng, lang)
            context = f"{a[:-1]}{markers[i - 4]}. {b}{markers[(i - 3) % 5]}"
        else:
            context = "[3][citation needed] "
        rows.append(
            {
                "instruction": question(rng, lang),
                "context": context,
                "response": paragraph(rng, lang, 2, 4),
                "category": "closed_qa" if context else "open_qa",
                "instruction_original_en": question(rng, "en"),
                "context_original_en": context,
                "response_original_en": sentence(rng, "en"),
                "id": f"{lang}-{i}",
            }
        )
    if lang == "de":
        rows[2]["response"] = ""
        rows[3]["instruction"] = "  "
    if lang == "es":
        rows[1]["instruction"] = "As a neutral AI, " + rows[1]["instruction"]
    if lang == "fr":
        rows[6]["response"] += " Unfortunately, I cannot provide more."
    return rows


def oa_leet10k(rng: random.Random) -> list[dict]:
    """25 rows; row 12 has an empty RESPONSE (empty_text), row 5 names OpenAI in its
    INSTRUCTION (phrase_filter).  24 pass the empty check, 23 the refusal filter too."""
    rows = []
    for i in range(25):
        name = CODE_NAMES[(i * 3) % len(CODE_NAMES)]
        rows.append(
            {
                "INSTRUCTION": f"LeetCode problem {i + 1}: {code_question(rng, name)}",
                "RESPONSE": code_answer(rng, name),
                "SOURCE": "leetcode",
            }
        )
    rows[12]["RESPONSE"] = ""
    rows[5]["INSTRUCTION"] += " Compare it with the OpenAI cookbook version."
    return rows


def P(*replies: dict, **fields) -> dict:
    """Spec of a prompter message (fields override the export defaults)."""
    return {"role": "prompter", "replies": list(replies), **fields}


def A(*replies: dict, rank: int | None = None, **fields) -> dict:
    """Spec of an assistant message with its ``rank`` among siblings."""
    return {"role": "assistant", "rank": rank, "replies": list(replies), **fields}


def build_message(rng: random.Random, spec: dict, tree: str, lang: str, ids: list) -> dict:
    """An export message node from a spec; ids ``{tree}-m{n}`` are assigned in pre-order
    (P0 is the root) to match the diagrams in :func:`oasst_lines`."""
    mid = f"{tree}-m{len(ids)}"
    ids.append(mid)
    role = spec["role"]
    if role == "prompter":
        text = f"{question(rng, lang)} {sentence(rng, lang)}"
    else:
        text = paragraph(rng, lang, 2, 4)
    node = {
        "message_id": mid,
        "parent_id": None,
        "user_id": f"user-{rng.randint(1, 99)}",
        "created_date": "2023-05-01T12:00:00.000000+00:00",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": None,
        "synthetic": False,
        "model_name": None,
        "emojis": {"+1": rng.randint(0, 5), "_skip_reply": rng.randint(0, 2)},
        "labels": {
            "spam": {"value": 0.0, "count": 3},
            "quality": {"value": round(rng.random(), 3), "count": 3},
        },
    }
    node.update({k: v for k, v in spec.items() if k != "replies"})
    node["replies"] = []
    for child in spec["replies"]:
        reply = build_message(rng, child, tree, lang, ids)
        reply["parent_id"] = mid
        node["replies"].append(reply)
    return node


def tree_line(
    rng: random.Random, tree: str, lang: str, root: dict, state: str = "ready_for_export"
) -> str:
    prompt = build_message(rng, root, tree, lang, [])
    record = {"message_tree_id": tree, "tree_state": state, "prompt": prompt}
    return json.dumps(record, ensure_ascii=False)


def oasst_lines(rng: random.Random) -> list[str]:
    """Message trees, one JSON line each (P = prompter, A = assistant, rN = rank N; message
    ``n`` of tree ``tK`` has id ``tK-mn``, numbered in pre-order).

    t1 en: P0 -> [A1 r0 -> [P2 -> [A3 r0, A4 r1], P5 (leaf, 2nd reply)], A6 r1, A7 r2]
    t2 de: P0 -> [A1 r0 -> P2 -> A3 rNone (only child), A4 rNone (3 siblings), A5 r1]
    t3 fr: P0 -> A1 r0 -> [P2 (leaf, 1st reply), P3 -> A4 rNone (only child)]
    t4 en: P0 -> [A1 r0 -> P2 -> [A3 r0 deleted, A4 r1], A5 r1 synthetic,
                  A6 r2 -> P7 (leaf, 1st reply, deleted)]
    t5 ja: P0 -> A1 r0                       (root language not in the card's list)
    t6 en: P0 -> A1 r0, tree_state "growing" (not ready_for_export)
    t7 en: P0 (review_result false) -> A1 r0
    t8 es: P0 -> A1 r0 -> P2 -> A3 r0 (lang en, review_result false: not checked) -> P4 -> A5 r0
    then a malformed JSON line, a tree without ``prompt`` (missing_field), t9 en whose
    assistant replies to an assistant (role_order), and two trees that pass the tree filter
    but yield no thread (upstream still splits them): t10 en: P0 -> A1 r0 deleted;
    t11 en: P0 alone.
    """
    lines = [
        tree_line(
            rng, "t1", "en", P(A(P(A(rank=0), A(rank=1)), P(), rank=0), A(rank=1), A(rank=2))
        ),
        tree_line(rng, "t2", "de", P(A(P(A()), rank=0), A(), A(rank=1))),
        tree_line(rng, "t3", "fr", P(A(P(), P(A()), rank=0))),
        tree_line(
            rng,
            "t4",
            "en",
            P(
                A(P(A(rank=0, deleted=True), A(rank=1)), rank=0),
                A(rank=1, synthetic=True),
                A(P(deleted=True), rank=2),
            ),
        ),
        tree_line(rng, "t5", "ja", P(A(rank=0))),
        tree_line(rng, "t6", "en", P(A(rank=0)), state="growing"),
        tree_line(rng, "t7", "en", P(A(rank=0), review_result=False)),
        tree_line(
            rng,
            "t8",
            "es",
            P(A(P(A(P(A(rank=0)), rank=0, lang="en", review_result=False)), rank=0)),
        ),
        '{"message_tree_id": "t-bad", "tree_state": "ready_for_export", "prompt": {"text": ',
        json.dumps({"message_tree_id": "t-noprompt", "tree_state": "ready_for_export"}),
        tree_line(rng, "t9", "en", P(A(A(rank=0), rank=0))),
        tree_line(rng, "t10", "en", P(A(rank=0, deleted=True))),
        tree_line(rng, "t11", "en", P()),
    ]
    return lines


def write_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_parquet(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, compression="zstd")


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed (zero) mtime and no file name, so outputs are reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    return buf.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    """A reproducible tar.gz: a directory entry per parent, fixed mtime/owner."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(name).parent) for name in files} - {"."})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1690070400
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1690070400
            tar.addfile(info, io.BytesIO(data))
    return gzip_bytes(buf.getvalue())


def main() -> None:
    rng = random.Random(20230723)
    write_json(HERE / "megacode2.json", megacode2(rng))
    write_json(HERE / "orca-chat-gpt4.json", orca_chat(rng))
    for lang in ("en", "de", "es", "fr"):
        write_parquet(
            HERE / "dolly15k" / "data" / f"{lang}-00000-of-00001.parquet", dolly(rng, lang)
        )
    leet = oa_leet10k(rng)
    write_parquet(HERE / "oa_leet10k.parquet", leet)
    (HERE / "oa_leet10k.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in leet), encoding="utf-8"
    )
    jsonl_gz = gzip_bytes("".join(line + "\n" for line in oasst_lines(rng)).encode("utf-8"))
    (HERE / "oasst_export.jsonl.gz").write_bytes(jsonl_gz)
    member = "2023-07-23_oasst_ready/2023-07-23_oasst_ready.trees.jsonl.gz"
    (HERE / "oasst_ready.tar.gz").write_bytes(tar_gz_bytes({member: jsonl_gz}))


if __name__ == "__main__":
    main()
