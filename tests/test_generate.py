"""Text in, text out: `psm-train generate` on an export directory and on a language-model run, and sampling."""

from __future__ import annotations

import pytest
import torch

from psm_train.cli import main
from psm_train.pretrained import export_pretrained, load_pretrained
from psm_train.pretrained.sampling import Sampling, generate, next_tokens
from tests.pretrained_helpers import lm_run


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    run = lm_run(root / "work")
    return run, export_pretrained(run, root / "model")


def test_text_prompt_on_export_and_run_directory(lm, capsys):
    run, export = lm
    model, tokenizer = load_pretrained(export)
    new, _ = generate(model, tokenizer.encode("the cat"), 12, stop_id=tokenizer.eot_id)
    for source in (export, run):  # the run directory used to crash: 'ShardStream' object has no attribute 'task'
        main(["generate", str(source), "--prompt", "the cat", "--max-new-tokens", "12"])
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "the cat" + tokenizer.decode(new)
        assert out[-1].startswith(f"state after {2 + len(new)} tokens: ") and "roots=" in out[-1]


def test_prompt_ids_sampling_and_errors(lm, capsys):
    _, export = lm
    args = ["generate", str(export), "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--temperature", "1.5",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    assert "prompt (3 tokens): 5 6 7" in first and "as text: " in first
    main(args)
    assert capsys.readouterr().out == first  # the seed fixes the sample
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        main(["generate", str(export), "--prompt-ids", "5,100000"])
    with pytest.raises(SystemExit, match="give --prompt TEXT"):
        main(["generate", str(export)])
    with pytest.raises(SystemExit, match="--top-p: expected a number in"):
        main(["generate", str(export), "--prompt", "the", "--top-p", "0"])


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(next_tokens(logits, Sampling(1.0, top_k=2), gen).tolist()) == {1, 3}
    probs = logits[0].softmax(-1)  # sorted: 1 (0.53), 3 (0.32), 2 (0.12), ...
    top_p = float(probs[1] + probs[3]) + 1e-3  # needs token 2 as well
    assert set(next_tokens(logits, Sampling(1.0, top_p=top_p), gen).tolist()) == {1, 3, 2}
    assert set(next_tokens(logits, Sampling(1.0, top_p=0.5), gen).tolist()) == {1}
    assert next_tokens(logits[:1], Sampling(0.0), gen).tolist() == [1]
