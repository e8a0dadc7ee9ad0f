"""The ``psm-train`` command: train, eval, generate, export (and submit, jobs, sweep, data)."""

from __future__ import annotations

import argparse
import os
import sys

from psm_train import __version__
from psm_train.config import ConfigError, load_config
from psm_train.errors import RunStopped


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-3 (repeatable)")


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing).

    A torchrun rank's parent is torchrun's elastic agent (``psm-train train --nproc N`` execs into it), which
    starts every rank in a new session: without this, SIGKILL of the launcher leaves the ranks training on.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was in place
        os._exit(1)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_launcher()
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides)  # validated here, before any rank starts
    if args.nproc > 1:
        # torchrun starts the ranks on this machine; each runs this command without --nproc.
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                "-m", "psm_train", "train", args.config, *(a for o in overrides for a in ("--set", o))]
        os.execv(sys.executable, argv)
    from psm_train.train import preemption
    from psm_train.train.loop import train

    # SIGTERM (timeout, kill, torchrun passing its own on) or SIGUSR2: checkpoint at the next logged step and exit 143.
    previous = preemption.install()
    try:
        result = train(cfg)
    finally:
        preemption.restore(previous)  # for callers of main() in-process
    if isinstance(result, dict) and result.get("preempted"):
        print(f"stopped by a signal after step {result['step']}; the same command resumes from its checkpoint",
              file=sys.stderr, flush=True)
        code = 143
    else:
        code = 0
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A finished torchrun rank skips interpreter finalization, where torch's gloo and autograd threads can
        # race the GIL teardown and abort it ("terminate called without an active exception", pytorch#190489).
        # Everything is written and the process group is destroyed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)


def cmd_export(args: argparse.Namespace) -> None:
    from psm_train.pretrained import export_pretrained

    try:
        out = export_pretrained(args.checkpoint, args.out, args.dtype)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}/ ({', '.join(sorted(f.name for f in out.iterdir()))}; {size / 1e6:.1f} MB)")


def cmd_eval_text(args: argparse.Namespace) -> None:
    from psm_train.pretrained.export_dir import load_for_inference
    from psm_train.pretrained.text_perplexity import text_perplexity

    try:
        model, tokenizer, _ = load_for_inference(args.checkpoint, args.overrides)
        if tokenizer is None:
            raise ValueError(f"--text: {args.checkpoint} has no tokenizer (a synthetic-task model reads token ids only)")
        r = text_perplexity(model, tokenizer, args.text, args.max_length)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"{args.text}: {r['documents']} documents, {r['words']} words, {r['tokens']} tokens, windows of {args.max_length}")
    print(f"word perplexity {r['word_perplexity']:.4f}  byte perplexity {r['byte_perplexity']:.4f}  "
          f"bits per byte {r['bits_per_byte']:.4f}  token perplexity {r['token_perplexity']:.4f}")
    if args.out:
        import json
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
        print(f"wrote {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.text:
        return cmd_eval_text(args)
    from psm_train.data import build_source
    from psm_train.pretrained import load_checkpoint
    from psm_train.train.evaluate import evaluate, write_eval_json
    from psm_train.train.loop import autocast_for, resolve_device

    model, cfg, payload = load_checkpoint(args.checkpoint, args.overrides)
    device = resolve_device(cfg.train.device)
    model.to(device)
    source = build_source(cfg.data.name, cfg.data.config, cfg.train.seed)
    eval_sets = source.eval_sets(cfg.train.eval_batches, cfg.train.eval_batch_size)
    print(f"{cfg.name}: {cfg.model.name} after {payload['step']} steps, task {cfg.data.name}, "
          f"{len(eval_sets)} length(s) on {device}", flush=True)
    groups = source.class_groups is not None
    print(f"{'length':>8} {'loss':>9} {'accuracy':>9} {'scored':>8}" + (f" {'sign acc':>9}" if groups else ""), flush=True)
    results = {}
    for seq_len, batches in eval_sets.items():  # one length at a time: a row as soon as it is done
        r = results[seq_len] = evaluate(model, {seq_len: batches}, device, autocast_for(cfg.train.precision, device),
                                        class_groups=source.class_groups, recall_distance=source.recall_distance)[seq_len]
        print(f"{seq_len:>8} {r['loss']:>9.4f} {r['acc']:>9.4f} {r['scored']:>8}" + (f" {r['group_acc']:>9.4f}" if groups else ""),
              flush=True)
    for seq_len, r in results.items():
        if "acc_by_distance" in r:  # MQAR: by how many chunks of distance_chunk tokens the query follows its key
            parts = [f"{k}: {'-' if a is None else f'{a:.4f}'} of {r['scored_by_distance'][k]}" for k, a in r["acc_by_distance"].items()]
            print(f"length {seq_len}, accuracy by key distance in chunks of {r['distance_chunk']}: " + ", ".join(parts))
    if args.out:  # the run's own eval.json stays as training wrote it
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_eval_json(Path(args.out), results)
        print(f"wrote {args.out}")


def _synthetic_prompt(cfg, seed: int) -> list[int]:
    """A held-out example of a synthetic task, cut before its first scored position."""
    import torch

    from psm_train.data import build_source
    from psm_train.data.source import derived_seed

    task = build_source(cfg.data.name, cfg.data.config, cfg.train.seed).task
    inputs, targets = task.make_batch(1, task.eval_seq_lens()[0], torch.Generator().manual_seed(derived_seed(seed, "prompt")))
    first_scored = int((targets[0] >= 0).nonzero()[0])
    print(f"expected next token (from the task): {int(targets[0, first_scored])}")
    return inputs[0, : first_scored + 1].tolist()


def cmd_generate(args: argparse.Namespace) -> None:
    from psm_train.pretrained.export_dir import load_for_inference
    from psm_train.pretrained.sampling import Sampling, generate

    try:
        model, tokenizer, cfg = load_for_inference(args.checkpoint, args.overrides)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    def ids(text: str, flag: str) -> list[int]:
        try:
            return [int(tok) for tok in text.split(",")]
        except ValueError:
            raise SystemExit(f"{flag}: expected comma-separated token ids, got {text!r}") from None

    if args.prompt_ids is not None:
        prompt = ids(args.prompt_ids, "--prompt-ids")
    elif args.prompt is not None:
        # Text when the model has a tokenizer; a model of a synthetic task takes ids here as well.
        prompt = tokenizer.encode(args.prompt) if tokenizer else ids(args.prompt, "--prompt (this model has no tokenizer)")
    elif cfg is not None and cfg.data.name != "shards":
        prompt = _synthetic_prompt(cfg, args.seed)
    else:
        raise SystemExit("give --prompt TEXT (or --prompt-ids 1,2,3)")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    try:
        out, state = generate(model, prompt, args.max_new_tokens, sampling, args.seed,
                              stop_id=tokenizer.eot_id if tokenizer else None)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if tokenizer is not None and args.prompt_ids is None:
        print(args.prompt + tokenizer.decode(out))
        print()
    else:
        print(f"prompt ({len(prompt)} tokens): {' '.join(map(str, prompt))}")
        print(f"continuation ({len(out)} tokens): {' '.join(map(str, out))}")
        if tokenizer is not None:
            print(f"as text: {tokenizer.decode(prompt + out)!r}")
    summary = state.describe()
    print(f"state after {len(prompt) + len(out)} tokens: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psm-train", description=__doc__)
    parser.add_argument("--version", action="version", version=f"psm-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config")
    p.add_argument("--run-dir", help="where config.yaml, metrics.jsonl and checkpoints go (default runs/<name>)")
    p.add_argument("--nproc", type=_positive_int, default=1, help="local ranks to start with torchrun (dp x sp, see parallel.sp)")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a self-contained model directory (weights, config, tokenizer, model card)")
    p.add_argument("checkpoint", help="a run directory, final.pt, or a checkpoints/step_* directory")
    p.add_argument("--out", required=True, help="the directory to create; loads with psm_train.load_pretrained "
                   "and transformers' AutoModelForCausalLM (trust_remote_code=True)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="of the stored weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its task's held-out sets (every eval length)")
    p.add_argument("checkpoint", help="a run directory, a .pt or .safetensors file, or a checkpoints/step_* directory")
    p.add_argument("--out", help="also write the results, per position included, as JSON in eval.json's format")
    p.add_argument("--text", help="instead: perplexity on this plain text file (an export directory works too), "
                   "scored as lm-evaluation-harness's loglikelihood_rolling scores it")
    p.add_argument("--max-length", type=int, default=2048, help="with --text: the scoring window in tokens")
    _add_overrides(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt token by token with the model's online state")
    p.add_argument("checkpoint", help="an export directory, a run directory, a .pt file, or a checkpoints/step_* directory")
    p.add_argument("--prompt", help="text to continue (token ids for a model without a tokenizer; default for a "
                   "synthetic task: a held-out example)")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens holding this probability")
    p.add_argument("--seed", type=int, default=0)
    _add_overrides(p)
    p.set_defaults(func=cmd_generate)

    from psm_train.launch.cli import add_commands  # submit, jobs, sweep

    add_commands(sub, _add_overrides)

    from psm_train.data.data_cli import add_data_parser  # data build, data verify

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from psm_train.launch.cli import sweep_shorthand

    args = build_parser().parse_args(sweep_shorthand(sys.argv[1:] if argv is None else list(argv)))
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as e:  # a full disk, a run directory in use: nothing a traceback would explain
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
