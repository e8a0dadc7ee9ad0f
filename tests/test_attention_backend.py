"""The attention selector: backend names and the CPU path against an explicit softmax."""

import torch

from psm_train.kernels.attention import attention, attention_backend, causal_mask


def test_cpu_backend_and_values():
    q, k, v = torch.randn(3, 2, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    assert attention_backend(q) == "sdpa"
    for causal in (False, True):
        scores = q @ k.transpose(-1, -2) / 8**0.5
        if causal:
            scores = scores.masked_fill(~causal_mask(5, 5, None, q.device), float("-inf"))
        torch.testing.assert_close(attention(q, k, v, causal=causal), scores.softmax(-1) @ v)
