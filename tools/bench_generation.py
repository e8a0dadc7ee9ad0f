"""Generation cost: per-token latency and state memory against context length, batch 1 and 64.

    python tools/bench_generation.py --out bench_generation.json

Models (random weights, bf16, inference mode; the cost of a step does not depend on the weights):
the paper's LM size, d 768, 12 heads, vocabulary 50257, tied embeddings:
- ``transformer``: 12 blocks, one KV cache per block (`TransformerGenerationState`);
- ``transformer_psm``: Agg 1 + Inf 12 blocks, chunk c (default 64): the binary counter of chunk
  states plus the Inf KV cache over at most 2c positions (`TransformerPSMGenerationState`);
- ``gla``: 12 GLA layers, 4 heads (key 96, value 192 per head): one fixed-size state per layer
  (`AffineGenerationState`).

Each model generates through its own ``init_generation(B).step(tokens)``, the code path of
``psm-train generate``. To time step n + 1 without running n steps first, the state is first
brought to context length n ("jump"), then W steps are timed one by one (CUDA synchronised after
every step), starting at a chunk boundary:
- transformer: every block's KV cache is filled with n random keys and values of the model's
  shape and dtype. A step's cost depends on the cache's size, not on its values.
- transformer_psm: the exact counter state after n / c chunks of random tokens at batch 1: one
  parallel upsweep (`psm_train.scan.tree.upsweep`) gives every aligned block aggregate; the roots
  are the blocks of the binary digits of n / c and the cached folds are their left folds, which
  is what `OnlineScan.push` builds chunk by chunk (`--check` compares the two). For batch B the
  batch-1 state is repeated B times.
- gla: a real chunked prefill of n random tokens at batch 1 (the layers' parallel form with a
  carried state, 65536 tokens a piece), its final states repeated B times.
W = 2c steps for Transformer-PSM (one chunk's push and one Inf prefill of the prefix state fall
in every c steps, so the mean is the amortised cost and the maximum the worst token), 32 for
the others. Latency is the mean over the W steps; state bytes are the model's own ``nbytes()``
after the window (tensors held for the next step: KV caches; roots, cached folds and the Inf
cache; recurrent states). Points whose state would exceed ``--max-state-gib`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from psm_train.models import MODELS, build_model
from psm_train.models.affine_lm import MixerState
from psm_train.scan.tree import upsweep

PAPER = dict(d_model=768, n_heads=12, layers=12, vocab=50257)


def make_model(kind: str, chunk: int, tiny: bool, device: torch.device) -> torch.nn.Module:
    d, heads, layers, vocab = (32, 2, 2, 97) if tiny else (PAPER["d_model"], PAPER["n_heads"], PAPER["layers"], PAPER["vocab"])
    if kind == "transformer":
        cfg = MODELS[kind][0](d_model=d, n_heads=heads, n_layers=layers)
    elif kind == "transformer_psm":
        cfg = MODELS[kind][0](d_model=d, n_heads=heads, chunk_size=chunk, agg_layers=1, inf_layers=layers)
    elif kind == "gla":
        cfg = MODELS[kind][0](d_model=d, n_layers=layers, n_heads=2 if tiny else 4, chunk_size=64)
    else:
        raise SystemExit(f"unknown model {kind!r}")
    cfg.validate()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_model(kind, cfg, vocab).to(device=device, dtype=dtype).eval()


def state_bytes_estimate(kind: str, model, n: int, batch: int) -> int:
    """Bytes the state at length n will hold (to skip points that cannot fit)."""
    el = next(model.parameters()).element_size()
    d = model.cfg.d_model
    if kind == "transformer":
        return 2 * len(model.blocks) * batch * n * d * el
    if kind == "transformer_psm":
        c = model.cfg.chunk_size
        roots = max(1, (n // c).bit_length())
        return 2 * roots * batch * c * d * el + 2 * len(model.inf_blocks) * batch * 2 * c * d * el
    return 0


def jump_transformer(model, n: int, batch: int, gen: torch.Generator):
    state = model.init_generation(batch)
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    for block, cache in zip(model.blocks, state.caches):
        attn = block.attn
        shape = (batch, attn.n_heads, n, attn.head_dim)
        cache.k = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        cache.v = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    state.tokens = n
    return state


def counter_from_upsweep(model, tokens: torch.Tensor):
    """The OnlineScan fields after pushing every chunk of ``tokens`` [1, n] (n a multiple of c)."""
    c, d = model.cfg.chunk_size, model.cfg.d_model
    m = tokens.shape[1] // c
    x = model.embed(tokens).view(1, m, c, d)
    blocks = upsweep(x, model.aggregate)
    top = m.bit_length()
    roots: list[torch.Tensor | None] = [None] * top
    folds: list[torch.Tensor | None] = [None] * top
    above = None
    for k in range(top - 1, -1, -1):
        if not (m >> k) & 1:
            continue
        root = blocks[k][:, (m >> k) - 1]  # the aligned block of 2^k chunks ending at chunk m
        roots[k] = root
        folds[k] = root if above is None else model.aggregate(above, root)
        above = folds[k]
    return roots, folds, m


def jump_psm(model, n: int, batch: int, gen: torch.Generator):
    c = model.cfg.chunk_size
    if n % c:
        raise ValueError(f"context length {n} is not a multiple of the chunk size {c}")
    state = model.init_generation(batch)
    tokens = torch.randint(0, model.head.out_features, (1, n), device=model.embed.weight.device, generator=gen)
    roots, folds, m = counter_from_upsweep(model, tokens)

    def rep(t):
        return None if t is None else t.expand(batch, *t.shape[1:]).contiguous()

    state.scan.roots = [rep(r) for r in roots]
    state.scan.folds = [rep(f) for f in folds]
    state.scan.chunks = m
    state.tokens = n
    return state


def jump_gla(model, n: int, batch: int, gen: torch.Generator, piece: int = 65536):
    state = model.init_generation(batch)
    device = model.embed.weight.device
    states = [None] * len(model.layers)
    for start in range(0, n, piece):
        tokens = torch.randint(0, model.head.out_features, (1, min(piece, n - start)), device=device, generator=gen)
        x = model.embed(tokens)
        for i, layer in enumerate(model.layers):
            x, states[i] = layer(x, states[i])
    if n:
        state.states = [MixerState(s.state.expand(batch, *s.state.shape[1:]).contiguous()) for s in states]
    state.tokens = n
    return state


JUMPS = {"transformer": jump_transformer, "transformer_psm": jump_psm, "gla": jump_gla}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_window(state, steps: int, batch: int, vocab: int, device: torch.device, gen: torch.Generator) -> list[float]:
    """Seconds of each of ``steps`` single-token steps, synchronised after each."""
    times = []
    tokens = torch.randint(0, vocab, (steps, batch), device=device, generator=gen)
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        state.step(tokens[i])
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def check_counter(device: torch.device) -> None:
    """The jumped Transformer-PSM state equals the one `OnlineScan.push` builds, for several n."""
    torch.manual_seed(0)
    model = make_model("transformer_psm", 4, True, device).float()
    gen = torch.Generator(device=device).manual_seed(0)
    for m in (1, 2, 3, 5, 6, 7, 8, 11, 13):
        n = 4 * m
        tokens = torch.randint(0, 97, (1, n), device=device, generator=gen)
        roots, folds, _ = counter_from_upsweep(model, tokens)
        ref = model.init_generation(1)
        with torch.no_grad():
            for t in range(n):
                ref.step(tokens[:, t])
        assert len(ref.scan.roots) == len(roots), (m, len(ref.scan.roots), len(roots))
        for a, b in zip(ref.scan.roots + ref.scan.folds, roots + folds):
            assert (a is None) == (b is None), m
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # and the next steps agree
        jumped = model.init_generation(1)
        jumped.scan.roots, jumped.scan.folds, jumped.scan.chunks, jumped.tokens = roots, folds, m, n
        nxt = torch.randint(0, 97, (1, 6), device=device, generator=gen)
        with torch.no_grad():
            for t in range(6):
                torch.testing.assert_close(jumped.step(nxt[:, t]), ref.step(nxt[:, t]), rtol=1e-4, atol=1e-4)
    print("check: jumped Transformer-PSM counter state == OnlineScan.push state (and next-step logits)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["transformer", "transformer_psm", "gla"])
    ap.add_argument("--chunk", type=int, default=64, help="Transformer-PSM chunk size c")
    ap.add_argument("--lengths", type=int, nargs="+",
                    default=[1024, 4096, 16384, 40960, 65536, 262144, 1048576])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--window", type=int, default=32, help="timed steps (Transformer-PSM: 2c)")
    ap.add_argument("--max-state-gib", type=float, default=100.0)
    ap.add_argument("--budget-s", type=float, default=600.0, help="start no new point after this many seconds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="d 32, 2 layers: a CPU smoke test of the script")
    ap.add_argument("--check", action="store_true", help="first check the jumped counter state against OnlineScan.push")
    ap.add_argument("--out", default="bench_generation.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(), chunk=args.chunk, tiny=args.tiny,
                date=time.strftime("%Y-%m-%d"))
    if args.check:
        check_counter(device)
    rows: list[dict] = []
    start = time.time()

    def write():
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    with torch.inference_mode():
        for kind in args.models:
            torch.manual_seed(0)
            model = make_model(kind, args.chunk, args.tiny, device)
            params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            vocab = model.head.out_features
            window = 2 * args.chunk if kind == "transformer_psm" else args.window
            gen = torch.Generator(device=device).manual_seed(0)
            # Warm-up (kernels, cuBLAS handles, allocator) on a short context.
            warm = JUMPS[kind](model, 2 * args.chunk, 1, gen)
            time_window(warm, window, 1, vocab, device, gen)
            del warm
            for batch in args.batches:
                for n in args.lengths:
                    row = dict(model=kind, params=params, batch=batch, context=n, window=window)
                    if kind == "transformer_psm":
                        row["chunk"] = args.chunk
                    if time.time() - start > args.budget_s:
                        row["skipped"] = "time budget"
                        rows.append(row)
                        continue
                    est = state_bytes_estimate(kind, model, n, batch)
                    if est > args.max_state_gib * 2**30:
                        row["skipped"] = f"state {est / 2**30:.0f} GiB > {args.max_state_gib:.0f} GiB"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        continue
                    state = None
                    try:
                        t0 = time.perf_counter()
                        state = JUMPS[kind](model, n, batch, gen)
                        sync(device)
                        row["jump_s"] = time.perf_counter() - t0
                        if kind == "transformer_psm":
                            row["roots_at_jump"] = state.scan.num_roots
                        times = time_window(state, window, batch, vocab, device, gen)
                        ms = [1e3 * t for t in times]
                        row.update(
                            ms_per_token=sum(ms) / len(ms), ms_median=sorted(ms)[len(ms) // 2], ms_max=max(ms),
                            state_bytes=state.nbytes(), **{k: v for k, v in state.describe().items() if k != "state_bytes"},
                        )
                        if device.type == "cuda":
                            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    except torch.OutOfMemoryError as e:
                        row["error"] = f"OOM: {str(e).splitlines()[0][:100]}"
                    del state
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write()
            del model
    write()

    print(f"\n{meta}")
    print("| model | batch | context | ms/token (mean) | median | max | state MiB | roots at n |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["model"] + (f" c{r['chunk']}" if "chunk" in r else "")
        if "ms_per_token" not in r:
            print(f"| {name} | {r['batch']} | {r['context']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        print(f"| {name} | {r['batch']} | {r['context']} | {r['ms_per_token']:.2f} | {r['ms_median']:.2f} | "
              f"{r['ms_max']:.2f} | {r['state_bytes'] / 2**20:.1f} | {r.get('roots_at_jump', '')} |")


if __name__ == "__main__":
    main()
