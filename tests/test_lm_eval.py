"""lm-evaluation-harness evaluates an export with local tasks (no hub), and agrees with psm-train:
word perplexity within 1e-5 relative of `psm-train eval --text` (lm-eval sums float32 log-probabilities),
each multiple-choice log-likelihood within 1e-4 of psm-train's model, and the same accuracy."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")  # the `hf` extra

from psm_train.cli import main  # noqa: E402
from psm_train.hf.lm_eval_tasks import write_tasks  # noqa: E402
from psm_train.pretrained import export_pretrained, load_pretrained  # noqa: E402
from psm_train.pretrained.text_perplexity import documents, rolling_windows  # noqa: E402
from tests.pretrained_helpers import WORDS, lm_run, run_fresh  # noqa: E402

LM_EVAL = """
import json, lm_eval
from lm_eval.tasks import TaskManager
res = lm_eval.simple_evaluate(model="hf", model_args="pretrained=model,trust_remote_code=True,max_length=32,dtype=float32",
                              tasks=["tiny_rolling", "tiny_choice"], task_manager=TaskManager(include_path="tasks"),
                              log_samples=True, batch_size=1, device="cpu")
choice = [{"doc": s["doc"], "lls": [float(r[0]) for r in s["filtered_resps"]]} for s in res["samples"]["tiny_choice"]]
json.dump({"results": res["results"], "choice": choice}, open("lm_eval.json", "w"))
"""


def wikitext_like(path, articles: int = 2, seed: int = 0) -> None:
    rng = random.Random(seed)
    parts = []
    for a in range(articles):
        parts.append(f" = Article {a} = \n \n")
        for _ in range(3):
            parts.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 30))) + " \n \n")
    path.write_text("".join(parts))


def test_rolling_windows_predict_every_token_once():
    for n, length in [(1, 4), (4, 4), (5, 4), (11, 4), (30, 7)]:
        predicted = []
        for start, end, scored in rolling_windows(n, length):
            assert 0 <= start < end <= n and end - start <= length and scored <= end - start
            predicted += range(end - scored, end)  # token i is predicted at input position i
        assert predicted == list(range(n)), (n, length)


def test_lm_eval_agrees_with_psm_train(tmp_path, capsys):
    export = export_pretrained(lm_run(tmp_path / "work"), tmp_path / "model")
    text = tmp_path / "text.txt"
    wikitext_like(text)
    assert len(documents(text.read_text())) == 2
    write_tasks(text, tmp_path / "tasks", "tiny", items=6)
    run_fresh(LM_EVAL, tmp_path, timeout=600)
    lm_eval = json.loads((tmp_path / "lm_eval.json").read_text())

    main(["eval", str(export), "--text", str(text), "--max-length", "32", "--out", str(tmp_path / "ppl.json")])
    ours = json.loads((tmp_path / "ppl.json").read_text())
    assert ours["tokens"] > 2 * 32  # the rolling windows are exercised
    theirs = lm_eval["results"]["tiny_rolling"]
    assert theirs["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-5)
    assert theirs["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)

    model, tok = load_pretrained(export)
    correct = 0
    for sample in lm_eval["choice"]:
        doc, lls = sample["doc"], []
        for choice in doc["choices"]:
            context = tok.encode(doc["context"])
            cont = tok.encode(doc["context"] + " " + choice)[len(context):]
            full = torch.tensor([context + cont])
            with torch.no_grad():
                logp = model(full[:, :-1])[0, -len(cont):].double().log_softmax(-1)
            lls.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        assert lls == pytest.approx(sample["lls"], abs=1e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["gold"]
    assert lm_eval["results"]["tiny_choice"]["acc,none"] == pytest.approx(correct / len(lm_eval["choice"]))
