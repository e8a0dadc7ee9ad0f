"""Predicted training-step time at 8-1024 GPUs for dp x sp x ZeRO stage, from a one-GPU measurement.

    python tools/cost_model.py --bench results.json                   # every measured row of bench_trainer
    python tools/cost_model.py --config configs/lm_psm_170m.yaml --seq-len 512 --batch-size 64 \\
        --tokens-per-s 160000 --act-bytes-per-token 600000

Weak scaling: every GPU keeps the one-GPU run's rows and tokens (B x T). Under sequence parallelism
of degree sp a sequence is sp x T long and each of its sp ranks holds T tokens of it.

Compute: the one-GPU run achieved R = tokens/s x F(T) FLOP/s (F = psm_train.train.flops); a rank's
step costs B T F(sp T) / R: the same efficiency, the model's work at the longer sequence.

Communication, per step and rank, from message sizes (S = the collective's whole buffer):
  gradient sum over all dp x sp ranks (ZeRO 0, the torch engine): all-reduce of the fp32 gradients,
      S = 4 P, each rank moving 2 (n-1)/n S
  ZeRO 1 and 2: reduce-scatter of the bf16 gradients and all-gather of the updated bf16 parameters,
      S = 2 P each, (n-1)/n S per rank each
  ZeRO 3: as ZeRO 2 plus a second parameter all-gather (forward and backward each gather)
  sequence-parallel exchange (forward all-gather, backward reduce-scatter of the same size), within
  the sp group:
      affine models (GLA, Mamba2, ...): per layer, every rank's carry [B, H, K, V + 1] in fp32
      (the state and its total log decay in one message), S = sp x 4 B H K (V + 1); Mamba2 also
      its convolution's halo, the last W - 1 inputs [B, W - 1, d] in fp32, S = sp x 4 B (W - 1) d
      Transformer-PSM: once per forward (the scan's single exchange), every rank's subtree root
      [B, c, d] in fp32, S = sp x 4 B c d
      transformer (context parallelism): per layer, K and V of every rank's slice in bf16,
      S = sp x 2 x 2 B T d
Time of a collective: S x (2 (n-1)/n for all-reduce, (n-1)/n otherwise) / bus bandwidth, plus a
latency of --latency-us x ceil(log2 n). Bus bandwidths inside a node: NCCL all-reduce of 1 GiB
through PyTorch on NVLink H100 hosts (INTRA_NODE_BUSBW, measured by an all-reduce of 1 GiB); a group
spanning nodes gets --inter-node-gbs (an ASSUMPTION, default 200 GB/s: 4 x 400 Gb/s InfiniBand a
node), the same figure for every collective kind. sp groups are placed inside a node when they fit.
The gradient and ZeRO traffic overlaps the compute up to --overlap of itself; the sequence-parallel
exchange sits on the critical path.

Memory per GPU: the ZeRO paper's bytes per parameter for bf16 mixed precision with AdamW (16 P; ZeRO 1
4 P + 12 P/n; ZeRO 2 2 P + 14 P/n; ZeRO 3 16 P/n) plus activations, bytes per token measured on one
GPU (from bench_trainer's peak memory: (peak - 16 P) / tokens), plus for the transformer the K/V of
the whole sequence each layer gathers under context parallelism (2 x 2 B sp T d bytes a layer).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INTRA_NODE_BUSBW = {1: math.inf, 2: 329e9, 4: 355e9, 8: 361e9}  # bytes/s: all-reduce of 1 GiB through PyTorch, H100 NVLink
GIB = 2**30


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter
    size: int  # S: bytes of the whole buffer (all-gather: the gathered result)
    ranks: int  # n: ranks in the group

    @property
    def per_rank_bytes(self) -> float:
        """Bytes each rank sends (and receives) in a ring: 2 (n-1)/n S for all-reduce, (n-1)/n S otherwise."""
        n = self.ranks
        factor = 2 * (n - 1) / n if self.kind == "all_reduce" else (n - 1) / n
        return factor * self.size


@dataclass(frozen=True)
class Network:
    inter_node_busbw: float = 200e9  # ASSUMPTION: bytes/s of a group spanning nodes
    gpus_per_node: int = 8
    latency_s: float = 10e-6  # per tree level of a collective

    def busbw(self, ranks: int) -> float:
        if ranks > self.gpus_per_node:
            return self.inter_node_busbw
        size = min(s for s in INTRA_NODE_BUSBW if s >= ranks)  # 3 GPUs take the 4-GPU figure
        return INTRA_NODE_BUSBW[size]

    def seconds(self, c: Collective) -> float:
        if c.ranks <= 1:
            return 0.0
        return c.per_rank_bytes / self.busbw(c.ranks) + self.latency_s * math.ceil(math.log2(c.ranks))


def zero_collectives(stage: int, n_params: int, world: int) -> list[Collective]:
    """Gradient and parameter traffic of one step over all ``world`` ranks."""
    if stage == 0:
        return [Collective("all_reduce", 4 * n_params, world)]
    out = [Collective("reduce_scatter", 2 * n_params, world), Collective("all_gather", 2 * n_params, world)]
    if stage == 3:
        out.append(Collective("all_gather", 2 * n_params, world))
    return out


def sp_messages(model, rows: int, tokens_per_rank: int, sp: int, act_bytes: int = 4, kv_bytes: int = 2) -> list[int]:
    """Sizes S of the all-gathers of one forward in an sp group (each has a reduce-scatter of S in the backward).

    ``model``: built on the meta device (psm_train.train.flops.meta_model). act_bytes: the residual stream's
    element size (fp32 under bf16 autocast); kv_bytes: attention K/V's (bf16 under autocast)."""
    from psm_train.models.affine_lm import AffineLM
    from psm_train.models.transformer import Transformer
    from psm_train.models.transformer_psm import TransformerPSM

    if sp <= 1:
        return []
    if isinstance(model, AffineLM):
        out = []
        for m in (layer.mixer for layer in model.layers):
            out.append(sp * 4 * rows * m.n_heads * m.head_k_dim * (m.head_v_dim + 1))  # fp32 carry and log decay
            if hasattr(m, "conv"):  # Mamba2: the previous rank's last width - 1 inputs of its convolution
                out.append(sp * act_bytes * rows * (m.conv.kernel_size[0] - 1) * model.cfg.d_model)
        return out
    if isinstance(model, TransformerPSM):
        return [sp * act_bytes * rows * model.cfg.chunk_size * model.cfg.d_model]
    if isinstance(model, Transformer):
        return [sp * kv_bytes * 2 * rows * tokens_per_rank * model.cfg.d_model] * len(model.blocks)
    raise ValueError(f"no sequence-parallel exchange known for {type(model).__name__}")


def sp_collectives(model, rows: int, tokens_per_rank: int, sp: int) -> list[Collective]:
    """The sequence-parallel exchange of one step: `sp_messages` forward and backward."""
    return [Collective(kind, size, sp) for size in sp_messages(model, rows, tokens_per_rank, sp)
            for kind in ("all_gather", "reduce_scatter")]


def static_bytes(stage: int, n_params: int, world: int) -> float:
    per_param = {0: 16, 1: 4 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage]
    return per_param * n_params


def gathered_kv_bytes(model, rows: int, seq_len: int, sp: int) -> float:
    """K/V of the whole sequence that context-parallel attention gathers and keeps for the backward, all layers."""
    from psm_train.models.transformer import Transformer

    if sp <= 1 or not isinstance(model, Transformer):
        return 0.0
    return len(model.blocks) * 2 * 2 * rows * seq_len * model.cfg.d_model


@dataclass
class Measured:
    """One model measured on one GPU."""

    name: str
    model_name: str
    model_cfg: object
    vocab_size: int
    seq_len: int
    rows: int
    tokens_per_s: float
    act_bytes_per_token: float | None


def predict(m: Measured, gpus: int, sp: int, stage: int, net: Network, overlap: float, gpu_mem: float) -> dict:
    from psm_train.train.flops import meta_model, numel, train_flops_per_token

    model = meta_model(m.model_name, m.model_cfg, m.vocab_size)
    n_params = numel(model)
    tokens = m.rows * m.seq_len  # per rank, as on the one GPU
    achieved = m.tokens_per_s * train_flops_per_token(m.model_name, m.model_cfg, m.vocab_size, m.seq_len)
    compute = tokens * train_flops_per_token(m.model_name, m.model_cfg, m.vocab_size, sp * m.seq_len) / achieved
    dp_comm = sum(net.seconds(c) for c in zero_collectives(stage, n_params, gpus))
    sp_comm = sum(net.seconds(c) for c in sp_collectives(model, m.rows, m.seq_len, sp))
    exposed_dp = dp_comm - min(overlap * dp_comm, compute)
    step = compute + exposed_dp + sp_comm
    memory = None
    if m.act_bytes_per_token is not None:
        memory = (static_bytes(stage, n_params, gpus) + m.act_bytes_per_token * tokens
                  + gathered_kv_bytes(model, m.rows, sp * m.seq_len, sp))
    return {"name": m.name, "gpus": gpus, "sp": sp, "dp": gpus // sp, "zero_stage": stage, "seq_len": sp * m.seq_len,
            "compute_s": compute, "dp_comm_s": dp_comm, "dp_exposed_s": exposed_dp, "sp_comm_s": sp_comm,
            "step_s": step, "tokens_per_s_per_gpu": tokens / step, "efficiency": compute / step,
            "memory_gib": memory / GIB if memory is not None else None,
            "fits": memory is None or memory <= gpu_mem}


def longest_sequence(m: Measured, sp: int, stage: int, gpu_mem: float) -> int | None:
    """The longest sequence one sp group (world = sp) trains at one row per rank, or None without a memory figure."""
    from psm_train.train.flops import meta_model, numel

    if m.act_bytes_per_token is None:
        return None
    model = meta_model(m.model_name, m.model_cfg, m.vocab_size)
    free = gpu_mem - static_bytes(stage, numel(model), sp)
    if free <= 0:
        return 0
    per_token = m.act_bytes_per_token / sp + gathered_kv_bytes(model, 1, 1, sp)  # bytes per token of the sequence
    return int(free / per_token)


def from_bench(path: str) -> list[Measured]:
    from psm_train.config import load_config
    from psm_train.train.flops import meta_model, numel

    out = []
    for row in json.loads(Path(path).read_text())["rows"]:
        if row.get("status") != "ok" or not row.get("tokens_per_s"):
            continue
        cfg = load_config(ROOT / row["config"], row["overrides"])
        act = None
        if row.get("peak_mem_gib"):
            n_params = numel(meta_model(cfg.model.name, cfg.model.config, row["vocab_size"]))
            act = max(0.0, row["peak_mem_gib"] * GIB - static_bytes(0, n_params, 1)) / row["tokens_per_step"]
        out.append(Measured(row["name"], cfg.model.name, cfg.model.config, row["vocab_size"], row["seq_len"],
                            row["batch_size"], row["tokens_per_s"], act))
    return out


def show(rows: list[dict], longest: list[tuple[str, int, int, int | None]]) -> None:
    print("| model | GPUs | dp x sp | ZeRO | seq | compute ms | grad/ZeRO comm ms (exposed) | SP comm ms | step ms "
          "| tokens/s/GPU | efficiency | GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = "—" if r["memory_gib"] is None else f"{r['memory_gib']:.1f}{'' if r['fits'] else ' (too big)'}"
        print(f"| {r['name']} | {r['gpus']} | {r['dp']} x {r['sp']} | {r['zero_stage']} | {r['seq_len']} "
              f"| {r['compute_s'] * 1e3:.1f} | {r['dp_comm_s'] * 1e3:.1f} ({r['dp_exposed_s'] * 1e3:.1f}) "
              f"| {r['sp_comm_s'] * 1e3:.1f} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s_per_gpu']:,.0f} "
              f"| {r['efficiency']:.0%} | {mem} |")
    if longest:
        print("\nLongest trainable sequence, one row per rank, world = sp:")
        print("| model | sp | ZeRO | tokens |")
        print("|---|---|---|---|")
        for name, sp, stage, t in longest:
            print(f"| {name} | {sp} | {stage} | {'—' if t is None else f'{t:,}'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", help="bench_trainer JSON: every row with a measured tokens/s")
    p.add_argument("--config", help="instead of --bench: a config file (with --set) and the numbers below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="rows per GPU")
    p.add_argument("--tokens-per-s", type=float, help="measured on one GPU")
    p.add_argument("--act-bytes-per-token", type=float, default=None, help="activation memory per token, one GPU")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64, 256, 1024])
    p.add_argument("--sp", type=int, nargs="+", default=[1, 8])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--inter-node-gbs", type=float, default=200, help="ASSUMED bus bandwidth across nodes, GB/s")
    p.add_argument("--latency-us", type=float, default=10)
    p.add_argument("--overlap", type=float, default=0.8, help="fraction of gradient/ZeRO traffic hidden by compute")
    p.add_argument("--gpu-mem-gib", type=float, default=80)
    p.add_argument("--longest-sp", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--out", help="write the predictions as JSON here")
    args = p.parse_args()

    if args.bench:
        measured = from_bench(args.bench)
        if not measured:
            raise SystemExit(f"{args.bench}: no row with status ok and a tokens/s")
    elif args.config:
        missing = [f for f in ("seq_len", "batch_size", "tokens_per_s") if getattr(args, f) is None]
        if missing:
            raise SystemExit(f"--config needs --{missing[0].replace('_', '-')}")
        from psm_train.config import load_config

        cfg = load_config(args.config, args.set)
        measured = [Measured(cfg.name, cfg.model.name, cfg.model.config, args.vocab_size, args.seq_len, args.batch_size,
                             args.tokens_per_s, args.act_bytes_per_token)]
    else:
        raise SystemExit("give --bench results.json (tools/bench_trainer.py --out) or --config with --tokens-per-s")
    net = Network(inter_node_busbw=args.inter_node_gbs * 1e9, latency_s=args.latency_us * 1e-6)
    mem = args.gpu_mem_gib * GIB
    rows = [predict(m, g, sp, stage, net, args.overlap, mem)
            for m in measured for g in args.gpus for sp in args.sp if sp <= g and g % sp == 0 for stage in args.zero]
    longest = [(m.name, sp, stage, longest_sequence(m, sp, stage, mem))
               for m in measured for sp in args.longest_sp for stage in (0, 3)]
    print(f"inter-node bus bandwidth {args.inter_node_gbs:.0f} GB/s (assumed), overlap {args.overlap:.0%}, "
          f"latency {args.latency_us:.0f} us a tree level, {args.gpu_mem_gib:.0f} GiB a GPU")
    show(rows, longest)
    if args.out:
        Path(args.out).write_text(json.dumps({"assumptions": vars(args), "rows": rows,
                                              "longest": [dict(zip(("name", "sp", "zero_stage", "tokens"), x))
                                                          for x in longest]}, indent=1))


if __name__ == "__main__":
    main()
