"""Generation at its worst case: per-token latency and state memory against context length, batch 1.

    python tools/bench_generation.py --out bench_generation.json
    python tools/bench_generation.py --models transformer_psm --chunk 32 --max-context 65536

Models (random weights, bf16 on GPU, inference mode; a step's cost does not depend on the weights), the
paper's LM size: d 768, 12 heads, 12 layers, vocabulary 50257, tied embeddings:
- ``transformer``: one KV cache per block (`TransformerGenerationState`);
- ``transformer_psm``: Agg 1 + Inf 12 blocks, chunk c: the binary counter of chunk states plus the
  Inf KV cache over at most 2c positions (`TransformerPSMGenerationState`);
- ``gla``: 4 heads (key 96, value 192 per head); ``mamba2``: head 64, state 64, expand 2: one
  fixed-size state per layer (`AffineGenerationState`).

Contexts are n = c·(2^k − 1) for every k with --min-context <= c·2^k <= --max-context: the counter
then holds k roots, all levels full, so the chunk that completes c tokens later carries through all
k levels (k Agg calls and one fold), and the next token prefills Inf with the new prefix. The
other models are measured at the same n.

Each point brings a fresh state to context n ("jump"), then times W steps one by one (CUDA
synchronised around every step); --repeats jumps and windows are pooled:
- transformer: every block's KV cache holds n random keys and values of the model's shape and
  dtype (a step's cost depends on the cache's size, not its values);
- transformer_psm: the generation state's `prefill` of n random tokens (the counter of the first
  n / c - 1 chunks from one parallel upsweep, `OnlineScan.prefill`: the same tree and
  parenthesisation as pushing them one by one; the last chunk stepped);
- gla, mamba2: a chunked prefill of n random tokens through the layers' parallel form, carrying
  the state between pieces of 65536 tokens.
W = 2c (default): the first step prefills Inf from the k-root prefix, step c pushes the completed
chunk, which carries through all levels (``ms_carry``; for a --contexts entry with n/c not of the
form 2^k − 1 through fewer, ``full_carry`` false), step c + 1 prefills Inf from the new prefix
(``ms_after_carry``), step 2c pushes without a carry. Reported per point: median, p99 and max over the pooled steps, the mean,
and the state's largest ``nbytes()`` over the window (KV caches; roots, cached folds, the Inf
cache and the current chunk; recurrent states). Points whose state would exceed --max-state-gib
are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from psm_train.models import MODELS, build_model
from psm_train.models.affine_lm import MixerState

PAPER = dict(d_model=768, n_heads=12, layers=12, vocab=50257)
TINY = dict(d_model=32, n_heads=2, layers=2, vocab=97)
MODEL_NAMES = ("transformer", "transformer_psm", "gla", "mamba2")


def make_model(kind: str, chunk: int, tiny: bool, device: torch.device) -> torch.nn.Module:
    size = TINY if tiny else PAPER
    d, heads, layers = size["d_model"], size["n_heads"], size["layers"]
    config_cls = MODELS[kind][0]
    if kind == "transformer":
        cfg = config_cls(d_model=d, n_heads=heads, n_layers=layers)
    elif kind == "transformer_psm":
        cfg = config_cls(d_model=d, n_heads=heads, chunk_size=chunk, agg_layers=1, inf_layers=layers)
    elif kind == "gla":
        cfg = config_cls(d_model=d, n_layers=layers, n_heads=2 if tiny else 4)
    elif kind == "mamba2":
        cfg = config_cls(d_model=d, n_layers=layers, head_dim=16 if tiny else 64, d_state=8 if tiny else 64)
    else:
        raise SystemExit(f"--models: unknown model {kind!r} (known: {', '.join(MODEL_NAMES)})")
    cfg.validate()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_model(kind, cfg, size["vocab"]).to(device=device, dtype=dtype).eval()


def worst_case_contexts(chunk: int, min_context: int, max_context: int) -> list[int]:
    """n = chunk·(2^k − 1) for every k >= 1 with min_context <= chunk·2^k <= max_context."""
    return [chunk * (2**k - 1) for k in range(1, 64) if min_context <= chunk * 2**k <= max_context]


def state_bytes_estimate(kind: str, model, n: int, batch: int) -> int:
    """Bytes the state at context n will hold (to skip points that cannot fit); 0 for fixed-size states."""
    el = next(model.parameters()).element_size()
    d = model.cfg.d_model
    if kind == "transformer":
        return 2 * len(model.blocks) * batch * n * d * el
    if kind == "transformer_psm":
        c = model.cfg.chunk_size
        roots = max(1, (n // c).bit_length())
        return 2 * roots * batch * c * d * el + 2 * len(model.inf_blocks) * batch * 2 * c * d * el
    return 0


def random_tokens(model, batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (batch, n), device=model.embed.weight.device, generator=gen)


def jump_transformer(model, n: int, batch: int, gen: torch.Generator):
    state = model.init_generation(batch)
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    for block, cache in zip(model.blocks, state.caches):
        shape = (batch, block.attn.n_heads, n, block.attn.head_dim)
        cache.k = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        cache.v = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    state.tokens = n
    return state


def prefilled_psm(model, tokens: torch.Tensor):
    """A Transformer-PSM generation state after tokens [B, n] (n a multiple of c), its counter from one upsweep."""
    if tokens.shape[1] % model.cfg.chunk_size:
        raise ValueError(f"context length {tokens.shape[1]} is not a multiple of the chunk size {model.cfg.chunk_size}")
    state = model.init_generation(tokens.shape[0])
    state.prefill(tokens)
    return state


def jump_psm(model, n: int, batch: int, gen: torch.Generator):
    return prefilled_psm(model, random_tokens(model, batch, n, gen))


def jump_affine(model, n: int, batch: int, gen: torch.Generator, piece: int = 65536):
    state = model.init_generation(batch)
    states: list[MixerState | None] = [None] * len(model.layers)
    for start in range(0, n, piece):
        x = model.embed(random_tokens(model, batch, min(piece, n - start), gen))
        for i, layer in enumerate(model.layers):
            x, states[i] = layer(x, states[i])
    if n:
        state.states = states
    state.tokens = n
    return state


JUMPS = {"transformer": jump_transformer, "transformer_psm": jump_psm, "gla": jump_affine, "mamba2": jump_affine}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_window(state, steps: int, batch: int, vocab: int, device: torch.device, gen: torch.Generator) -> tuple[list[float], int]:
    """Seconds of each of ``steps`` single-token steps, synchronised around each; the largest state bytes seen."""
    times, most = [], state.nbytes()
    tokens = torch.randint(0, vocab, (steps, batch), device=device, generator=gen)
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        state.step(tokens[i])
        sync(device)
        times.append(time.perf_counter() - t0)
        most = max(most, state.nbytes())
    return times, most


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@torch.no_grad()
def check_jump(device: torch.device) -> None:
    """The jumped Transformer-PSM state gives the logits that stepping through the same tokens gives."""
    torch.manual_seed(0)
    model = make_model("transformer_psm", 4, True, device).float()
    gen = torch.Generator(device=device).manual_seed(0)
    for m in (1, 3, 6, 7, 13):
        n = 4 * m
        tokens = random_tokens(model, 1, n + 6, gen)
        stepped = model.init_generation(1)
        for t in range(n):
            stepped.step(tokens[:, t])
        jumped = prefilled_psm(model, tokens[:, :n])
        assert jumped.scan.num_roots == stepped.scan.num_roots == bin(m).count("1"), m
        calls = jumped.scan.agg_calls
        for t in range(n, n + 6):
            torch.testing.assert_close(jumped.step(tokens[:, t]), stepped.step(tokens[:, t]), rtol=1e-4, atol=1e-4)
            if t == n + 3 and m & (m + 1) == 0:  # m = 2^k - 1: the 4th step's push carries through all k levels
                assert jumped.scan.agg_calls - calls == m.bit_length() and jumped.scan.num_roots == 1, m
    print("check: a prefilled Transformer-PSM state steps like one that stepped through the same tokens; "
          "at n/c = 2^k - 1 the c-th step carries through all k levels")


def measure(kind: str, model, n: int, args, device: torch.device, gen: torch.Generator) -> dict:
    """One (model, context) point: pooled step times over --repeats fresh jumps to context n."""
    c = args.chunk
    window = args.window or 2 * c
    m = n // c
    # full_carry: the counter's levels are all full, so the window's first push carries through every one
    row: dict = dict(context=n, chunks=m, levels=m.bit_length(), full_carry=m & (m + 1) == 0, window=window,
                     repeats=args.repeats)
    times, carry, after, state_bytes, jump_s = [], [], [], 0, []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state = JUMPS[kind](model, n, args.batch, gen)
        sync(device)
        jump_s.append(time.perf_counter() - t0)
        if kind == "transformer_psm":
            row["roots_at_jump"] = state.scan.num_roots
        steps, most = time_window(state, window, args.batch, model.vocab_size, device, gen)
        del state
        times += steps
        state_bytes = max(state_bytes, most)
        if window > c:  # step c completes the window's first chunk; its push carries (through all levels if full_carry)
            carry.append(steps[c - 1])
            after.append(steps[c])
    ms = [1e3 * t for t in times]
    row.update(ms_median=statistics.median(ms), ms_p99=percentile(ms, 99), ms_max=max(ms),
               ms_per_token=sum(ms) / len(ms), state_bytes=state_bytes, jump_s=min(jump_s))
    if carry:
        row.update(ms_carry=1e3 * statistics.median(carry), ms_after_carry=1e3 * statistics.median(after))
    return row


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta}")
    print("| model | context | n/c | levels | median ms | p99 ms | max ms | carry token ms | next token ms | mean ms | state MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["model"] + (f" c{r['chunk']}" if "chunk" in r else "")
        head = f"| {name} | {r['context']} | {r.get('chunks', '')} | {r.get('levels', '')} |"
        if "ms_median" not in r:
            print(f"{head} {r.get('skipped') or r.get('error')} | | | | | | |")
            continue
        carry = (f"{r['ms_carry']:.2f} | {r['ms_after_carry']:.2f}" if "ms_carry" in r else " | ")
        print(f"{head} {r['ms_median']:.2f} | {r['ms_p99']:.2f} | {r['ms_max']:.2f} | {carry} | "
              f"{r['ms_per_token']:.2f} | {r['state_bytes'] / 2**20:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    ap.add_argument("--chunk", type=int, default=64, help="Transformer-PSM chunk size c (also sets the contexts)")
    ap.add_argument("--min-context", type=int, default=1024, help="smallest c·2^k of the contexts c·(2^k − 1)")
    ap.add_argument("--max-context", type=int, default=1 << 20, help="largest c·2^k of the contexts c·(2^k − 1)")
    ap.add_argument("--contexts", type=int, nargs="+", help="measure these contexts instead (multiples of c)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--window", type=int, default=0, help="timed steps per repeat (0: 2c)")
    ap.add_argument("--repeats", type=int, default=3, help="jumps to each context, their windows pooled")
    ap.add_argument("--max-state-gib", type=float, default=60.0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no new point after this many seconds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="d 32, 2 layers: a CPU smoke test of the script")
    ap.add_argument("--check", action="store_true", help="first check the jump against stepping token by token")
    ap.add_argument("--out", default="bench_generation.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_generation.py --device cuda needs a CUDA GPU; use --device cpu --tiny for a smoke test")
    contexts = args.contexts or worst_case_contexts(args.chunk, args.min_context, args.max_context)
    bad = [n for n in contexts if n <= 0 or n % args.chunk]
    if bad or not contexts:
        raise SystemExit(f"--contexts: expected positive multiples of --chunk {args.chunk}, got {bad or 'none'}")
    if args.repeats < 1 or args.window < 0 or args.batch < 1:
        raise SystemExit("--repeats and --batch: expected >= 1; --window: expected >= 0")
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(), chunk=args.chunk, batch=args.batch,
                tiny=args.tiny, repeats=args.repeats, date=time.strftime("%Y-%m-%d"))
    if args.check:
        check_jump(device)
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
            gen = torch.Generator(device=device).manual_seed(0)
            # Warm-up (kernels, cuBLAS handles, allocator) on a short context.
            warm = JUMPS[kind](model, args.chunk, args.batch, gen)
            time_window(warm, args.window or 2 * args.chunk, args.batch, model.vocab_size, device, gen)
            del warm
            for n in contexts:
                row = dict(model=kind, params=params, batch=args.batch, context=n)
                if kind == "transformer_psm":
                    row["chunk"] = args.chunk
                est = state_bytes_estimate(kind, model, n, args.batch)
                if time.time() - start > args.budget_s:
                    row["skipped"] = "time budget"
                elif est > args.max_state_gib * 2**30:
                    row["skipped"] = f"state {est / 2**30:.0f} GiB > {args.max_state_gib:.0f} GiB"
                else:
                    try:
                        row.update(measure(kind, model, n, args, device, gen))
                        if device.type == "cuda":
                            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    except torch.OutOfMemoryError as e:
                        row["error"] = f"OOM: {str(e).splitlines()[0][:100]}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                rows.append(row)
                print(json.dumps(row), flush=True)
                write()
            del model
    write()
    print_table(meta, rows)


if __name__ == "__main__":
    main()
