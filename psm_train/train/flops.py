"""Model FLOPs of one training token, for MFU: what the model must compute, not what a kernel happens to do.

Convention (torchtitan's, and the issue's): a matrix-vector product with a weight of P elements costs
2P FLOPs; the backward costs twice the forward, so training costs 3x. Norm gains and other small
parameters are counted like weights (negligible). The input embedding is a lookup and not counted;
the LM head is (also when tied to the embedding), at its padded width.

    transformer      6 N + 6 L d T_att       N = parameters other than the input embedding, head included;
                                             T_att = T (causal: each query sees T/2 keys, 4d FLOPs a key
                                             forward); with a sliding window w < T, T_att = 2w - w^2/T
    affine (GLA,     6 N + 3 L H (C (K + V) + 4 K V)
    Mamba2, ...)                             per head: the chunk's causal scores q.k and scores.v over
                                             C/2 keys on average (2 C/2 (K + V)), the chunk state k^T v
                                             and the read q S_in (2 K V each); C the scan's chunk size,
                                             H heads of state [K, V]
    Transformer-PSM  3 x (forward of one sequence) / T, from the model's own structure:
                     chunks n = ceil(T / c). Inf: chunk 0 alone over c positions, the other n - 1 over
                     [prefix; chunk] = 2c positions, causal; Agg: bidirectional over 2c positions,
                     as many calls as the Blelloch tree makes for n chunks (counted by running
                     `psm_train.scan.prefix_scan` itself). The last block of each Agg and Inf call
                     computes only its kept c positions: keys and values (and their norm) over the
                     whole window, queries, output projection and MLP over c. Attention pairs: Agg
                     2c x 2c (last block c x 2c); Inf (2c)^2 / 2 (last block c x 1.5c, the chunk's
                     queries over the prefix and causally over the chunk); chunk 0 alone c^2 / 2.
                     Plus the final norm and head over the T tokens.

Parameter counts come from the model built on the meta device (no memory), so they follow the model
code (vocabulary padding, tied weights, every mixer's projections) without restating it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from psm_train.models import build_model
from psm_train.models.affine_lm import AffineLM
from psm_train.models.layers import Block
from psm_train.models.transformer import Transformer
from psm_train.models.transformer_psm import TransformerPSM
from psm_train.scan import prefix_scan

# Dense bf16 tensor-core peak without sparsity, FLOP/s: H100 SXM; the H200 has the same chip.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name() ('NVIDIA H100 80GB HBM3'); None if unknown."""
    for chip, peak in PEAK_BF16.items():
        if chip in device_name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the fraction of the peak that the model's own FLOPs would use."""
    return tokens_per_s * flops_per_token / peak


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(module))


def matmul_parameters(model: nn.Module) -> int:
    """N: every parameter but the input embedding, the head counted even when it is the embedding's weight."""
    n = numel(model) - model.embed.weight.numel()
    if model.head.weight is model.embed.weight:
        n += model.head.weight.numel()
    return n


def meta_model(model_name: str, model_cfg, vocab_size: int) -> nn.Module:
    with torch.device("meta"):
        return build_model(model_name, model_cfg, vocab_size)


def block_flops(block: Block, window: int, keep: int, pairs: float) -> float:
    """Forward FLOPs of one attention block over ``window`` positions of which it computes ``keep``, with ``pairs``
    query-key pairs (each 2d for the score and 2d for the value)."""
    d = block.attn.qkv.in_features
    qkv = block.attn.qkv.weight.numel()
    over_window = block.attn_norm.weight.numel() + qkv * 2 // 3  # norm, keys and values
    over_kept = qkv // 3 + numel(block.attn.out) + numel(block.mlp_norm) + numel(block.mlp)
    return 2 * (over_window * window + over_kept * keep) + 4 * d * pairs


def blocks_flops(blocks: nn.ModuleList, window: int, keep: int, pairs_full: float, pairs_last: float) -> float:
    """A run_blocks call: every block over the window, the last one computing only ``keep`` positions."""
    *first, last = blocks
    return sum(block_flops(b, window, window, pairs_full) for b in first) + block_flops(last, window, keep, pairs_last)


def agg_calls(n_chunks: int) -> int:
    """Agg applications of the prefix scan over n chunks, counted by running the tree on placeholder states."""
    count = 0

    def counting(older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += older.shape[0]
        return newer

    prefix_scan(torch.zeros(1, n_chunks, 1), counting)
    return count


def psm_forward_flops(model: TransformerPSM, seq_len: int) -> float:
    """Forward FLOPs of one sequence of seq_len tokens through Transformer-PSM (see the module docstring)."""
    c = model.cfg.chunk_size
    n = math.ceil(seq_len / c)
    first_chunk = blocks_flops(model.inf_blocks, c, c, c * c / 2, c * c / 2)
    inf = (n - 1) * blocks_flops(model.inf_blocks, 2 * c, c, (2 * c) ** 2 / 2, c * 1.5 * c)
    agg = agg_calls(n) * blocks_flops(model.agg_blocks, 2 * c, c, (2 * c) ** 2, c * 2 * c)
    head = 2 * (numel(model.norm) + model.head.weight.numel()) * seq_len
    return first_chunk + inf + agg + head


def train_flops_per_token(model_name: str, model_cfg, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token of a model at sequence length seq_len."""
    model = meta_model(model_name, model_cfg, vocab_size)
    if isinstance(model, TransformerPSM):
        return 3 * psm_forward_flops(model, seq_len) / seq_len
    n = matmul_parameters(model)
    if isinstance(model, Transformer):
        w = model.cfg.sliding_window
        t_att = seq_len if w is None or w >= seq_len else 2 * w - w * w / seq_len
        return 6 * n + 6 * len(model.blocks) * model.cfg.d_model * t_att
    if isinstance(model, AffineLM):
        scan = 0.0
        for layer in model.layers:
            m = layer.mixer
            k, v, chunk = m.head_k_dim, m.head_v_dim, min(m.chunk_size, seq_len)
            scan += 3 * m.n_heads * (chunk * (k + v) + 4 * k * v)
        return 6 * n + scan
    raise ValueError(f"no FLOP count for model {model_name!r} ({type(model).__name__})")
