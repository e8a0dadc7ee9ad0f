"""transformers loads every model family from an export directory: psm-train's logits, generate() on the
model's own online state, and the tokenizer (a trained BPE and a converted tiktoken file)."""

from __future__ import annotations

import base64
import json

import pytest
import torch

pytest.importorskip("transformers")  # the `hf` extra

from psm_train.pretrained import export_pretrained, load_checkpoint  # noqa: E402
from tests.pretrained_helpers import FAMILIES, lm_run, run_fresh, synthetic_run  # noqa: E402

HF_CHECK = """
import json, torch
from transformers import AutoModelForCausalLM
import psm_train
from psm_train.pretrained.sampling import generate
out = {}
for name in NAMES:
    hf = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)
    ref, _ = psm_train.load_pretrained(name)
    tokens = torch.load('tokens.pt')
    with torch.no_grad():
        logits = hf(tokens).logits
    calls = []  # the parallel forward: once for the prompt, never again while generating
    hook = hf.model.register_forward_hook(lambda m, args, res: calls.append(args[0].shape))
    prompt = tokens[:1, :9]
    greedy = hf.generate(prompt, max_new_tokens=6, do_sample=False)[0, 9:].tolist()
    assert calls == [torch.Size([1, 9])], calls
    hook.remove()
    torch.manual_seed(0)
    sampled = hf.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5, temperature=0.9)
    loss = hf(tokens, labels=tokens).loss  # transformers' convention: labels are the inputs, shifted inside
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    out[name] = {"max_diff": float((logits - ref(tokens)).abs().max()), "loss_diff": float(abs(loss - expected)), "greedy": greedy,
                 "reference_greedy": generate(ref, prompt[0].tolist(), 6)[0], "sampled": sampled.shape[1],
                 "state_bytes": hf.generate(prompt, max_new_tokens=1, return_dict_in_generate=True).cache.nbytes()}
json.dump(out, open('hf.json', 'w'))
"""


def test_every_family_round_trips_through_transformers(tmp_path):
    tokens = torch.randint(0, 37, (2, 23), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    for name in FAMILIES:
        run = synthetic_run(tmp_path / "runs", name)
        export_pretrained(run, tmp_path / name)
        model, _, _ = load_checkpoint(run)
        with torch.no_grad():
            torch.save(model(tokens), tmp_path / f"{name}.pt")
    run_fresh(f"NAMES = {list(FAMILIES)}\n" + HF_CHECK, tmp_path)
    results = json.loads((tmp_path / "hf.json").read_text())
    for name, r in results.items():
        assert r["max_diff"] <= 1e-5 and r["loss_diff"] <= 1e-6, (name, r)
        assert r["greedy"] == r["reference_greedy"], (name, r)
        assert r["sampled"] == 9 + 6 and r["state_bytes"] > 0, (name, r)


def test_auto_tokenizer_matches_the_exported_tokenizer(tmp_path):
    run = lm_run(tmp_path / "work")
    export_pretrained(run, tmp_path / "model")
    text = "the cat sat on  a mat, and 12 birds! sang\n\nthe dog"
    out = run_fresh(f"""
import json, psm_train
from transformers import AutoTokenizer
hf = AutoTokenizer.from_pretrained('model', trust_remote_code=True)
_, tok = psm_train.load_pretrained('model')
ids = tok.encode({text!r})
print(json.dumps([hf.encode({text!r}), ids, hf.decode(ids), hf.eos_token_id, tok.eot_id]))
""", tmp_path)
    hf_ids, ids, decoded, eos, eot = json.loads(out)
    assert hf_ids == ids and decoded == text and eos == eot


def test_tiktoken_file_is_converted_for_transformers(tmp_path):
    from psm_train.hf.tiktoken_conversion import tiktoken_to_tokenizers
    from psm_train.pretrained import TextTokenizer

    # A tiktoken file with merges: the 256 bytes, then tokens built from them in rank order.
    ranks = [bytes([i]) for i in range(256)]
    for merged in (b"th", b"he", b"the", b" t", b" the", b"at", b"cat", b" cat", b"in", b"ing", b" s", b"at "):
        ranks.append(merged)
    path = tmp_path / "small.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    reference, converted = TextTokenizer(path), tiktoken_to_tokenizers(path)
    for text in ["the cat sat thinking", "  the  cats\n\nthe", "ünïcode thé", "sing at the cat's"]:
        assert converted.encode(text).ids == reference.encode(text), text
        assert converted.decode(reference.encode(text)) == text
    assert converted.token_to_id("<|endoftext|>") == reference.eot_id
