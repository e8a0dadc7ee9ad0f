"""The ``psm-train`` command: train, eval, generate, export (and submit, jobs, sweep, data)."""

from __future__ import annotations

import argparse
import os
import sys

from psm_train.config import ConfigError, load_config


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-3 (repeatable)")


def cmd_train(args: argparse.Namespace) -> None:
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
    from psm_train.train.checkpoint import export_safetensors

    out = export_safetensors(args.checkpoint, args.out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def cmd_eval(args: argparse.Namespace) -> None:
    from psm_train.data import build_source
    from psm_train.train.checkpoint import load_checkpoint
    from psm_train.train.evaluate import evaluate, write_eval_json
    from psm_train.train.loop import autocast_for, resolve_device

    model, cfg, payload = load_checkpoint(args.checkpoint, args.overrides)
    device = resolve_device(cfg.train.device)
    model.to(device)
    source = build_source(cfg.data.name, cfg.data.config, cfg.train.seed)
    results = evaluate(model, source.eval_sets(cfg.train.eval_batches, cfg.train.eval_batch_size), device,
                       autocast_for(cfg.train.precision, device), class_groups=source.class_groups)
    print(f"{cfg.name}: {cfg.model.name} after {payload['step']} steps, task {cfg.data.name}")
    groups = source.class_groups is not None
    print(f"{'length':>8} {'loss':>9} {'accuracy':>9} {'scored':>8}" + (f" {'sign acc':>9}" if groups else ""))
    for seq_len, r in results.items():
        print(f"{seq_len:>8} {r['loss']:>9.4f} {r['acc']:>9.4f} {r['scored']:>8}" + (f" {r['group_acc']:>9.4f}" if groups else ""))
    if args.out:  # the run's own eval.json stays as training wrote it
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_eval_json(Path(args.out), results)
        print(f"wrote {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from psm_train.data import build_source
    from psm_train.train.checkpoint import load_checkpoint
    from psm_train.data.source import derived_seed

    model, cfg, _ = load_checkpoint(args.checkpoint, args.overrides)
    if args.prompt:
        try:
            prompt = [int(tok) for tok in args.prompt.split(",")]
        except ValueError:
            raise SystemExit(f"--prompt: expected comma-separated token ids, got {args.prompt!r}") from None
    else:
        # A held-out example of the training task, cut before its first scored position.
        source = build_source(cfg.data.name, cfg.data.config, cfg.train.seed)
        task = source.task
        inputs, targets = task.make_batch(1, task.eval_seq_lens()[0], torch.Generator().manual_seed(derived_seed(args.seed, "prompt")))
        first_scored = int((targets[0] >= 0).nonzero()[0])
        prompt = inputs[0, : first_scored + 1].tolist()
        print(f"expected next token (from the task): {int(targets[0, first_scored])}")
    bad = [t for t in prompt if not 0 <= t < model.head.out_features]
    if bad:
        raise SystemExit(f"--prompt: token ids {bad} are outside the vocabulary [0, {model.head.out_features})")

    generator = torch.Generator().manual_seed(args.seed)
    state = model.init_generation(1)
    with torch.no_grad():
        for tok in prompt:
            logits = state.step(torch.tensor([tok]))
        out = []
        for _ in range(args.max_new_tokens):
            if args.temperature <= 0:
                nxt = int(logits[0].argmax())
            else:
                probs = torch.softmax(logits[0].float() / args.temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            out.append(nxt)
            logits = state.step(torch.tensor([nxt]))
    print(f"prompt ({len(prompt)} tokens): {' '.join(map(str, prompt))}")
    print(f"continuation ({len(out)} tokens): {' '.join(map(str, out))}")
    summary = state.describe()
    print("state: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psm-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config")
    p.add_argument("--run-dir", help="where config.yaml, metrics.jsonl and checkpoints go (default runs/<name>)")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to start with torchrun (dp x sp, see parallel.sp)")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a checkpoint's consolidated weights and config as safetensors")
    p.add_argument("checkpoint", help="a run directory, final.pt, or a checkpoints/step_* directory")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its task's held-out sets (every eval length)")
    p.add_argument("checkpoint", help="a run directory, a .pt or .safetensors file, or a checkpoints/step_* directory")
    p.add_argument("--out", help="also write the results, per position included, as JSON in eval.json's format")
    _add_overrides(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt token by token with the online state")
    p.add_argument("checkpoint", help="a run directory, a .pt or .safetensors file, or a checkpoints/step_* directory")
    p.add_argument("--prompt", help="comma-separated token ids (default: a held-out example of the task)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    _add_overrides(p)
    p.set_defaults(func=cmd_generate)

    from psm_train.launch.cli import add_commands  # submit, jobs, sweep

    add_commands(sub, _add_overrides)

    from psm_train.data.data_cli import add_data_parser  # data build, data verify

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
