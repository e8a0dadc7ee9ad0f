"""Continuing a prompt with a model's online state: greedy or sampled (temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k: expected >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p: expected a number in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
             stop_id: int | None = None):
    """(new token ids, the generation state): ``prompt`` fed to ``model.init_generation(1)`` token by token,
    then up to ``max_new_tokens`` tokens, stopping after ``stop_id`` (which is not returned)."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < model.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {model.vocab_size})")
    sampling.validate()
    generator = torch.Generator().manual_seed(seed)
    state = model.init_generation(1)
    for tok in prompt:
        logits = state.step(torch.tensor([tok]))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(next_tokens(logits, sampling, generator)[0])
        if nxt == stop_id:
            break
        out.append(nxt)
        logits = state.step(torch.tensor([nxt]))
    return out, state
