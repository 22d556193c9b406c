"""The forgetting trade-off on the example data: the same SFT with and without each mitigation.

    python -m bench.forgetting                         # SmolLM2 fixture on the CPU: ~20 minutes on 2 cores
    python -m bench.forgetting --settings plain,kl --steps 10   # a shorter look

Every setting fine-tunes the SmolLM2 fixture on ``examples/license_qa.jsonl`` for the same steps
from the same seed, at a learning rate high enough that plain SFT forgets (``--lr``, default
2e-3: ten times the SFT default), measuring ``examples/general_text.jsonl`` as the retention set
(``--retain-data``) at step 0, every ``--eval-every`` steps and the end. They differ only by
their mitigation of forgetting:

* ``plain``: none;
* ``replay``: ``--replay-data examples/general_replay.jsonl --replay-ratio R`` (other prose of the
  same source as the retention set, never the retention set itself: `examples/GENERAL.md`);
* ``kl``: ``--kl-to-base β``;
* ``replay+kl``: both.

For each: the held-out domain loss (``examples/license_qa_eval.jsonl``) at the end, the retention
loss, its rise over the base (``retain/loss_delta``) and the KL to the base per token, with every
evaluation along the way. Then ``engine.eval`` compares the adapters side by side (its table,
KL-to-base column and ``eval_tradeoff.png``, in ``OUT/eval``). Results go to
``bench/results/forgetting-<device>-<date>.json`` (``--results``) and a markdown table is printed.
Times are wall seconds of this machine, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, environment
from engine.config import TrainConfig
from engine.eval import main as eval_main
from engine.recipes import sft
from engine.run.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETTINGS = ("plain", "replay", "kl", "replay+kl")


def setting_flags(name: str, replay_ratio: float, kl_to_base: float) -> dict:
    """The flags that make one setting (module docstring)."""
    flags = {}
    if "replay" in name:
        flags.update(replay_data=str(EXAMPLES / "general_replay.jsonl"), replay_ratio=replay_ratio)
    if "kl" in name:
        flags["kl_to_base"] = kl_to_base
    return flags


def run_setting(name: str, args: argparse.Namespace, model: str) -> dict:
    """Train one setting; its final figures and every evaluation."""
    output = Path(args.out) / name.replace("+", "-")
    cfg = TrainConfig(model=model, data=str(EXAMPLES / "license_qa.jsonl"),
                      eval_data=str(EXAMPLES / "license_qa_eval.jsonl"),
                      retain_data=str(EXAMPLES / "general_text.jsonl"), output=str(output), overwrite=True,
                      max_steps=args.steps, lr=args.lr, max_len=256, eval_every=args.eval_every, seed=args.seed,
                      **setting_flags(name, args.replay_ratio, args.kl_to_base))
    start = time.perf_counter()
    run = sft.train(cfg, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    evals = [{k: r[k] for k in ("step", "loss", "retain/loss", "retain/loss_delta", "retain/kl")}
             for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "eval"]
    final = run.final_eval
    return {"setting": name, "flags": setting_flags(name, args.replay_ratio, args.kl_to_base),
            "adapter": str(output / "adapter"), "domain_loss": final["loss"], "retain_loss": final["retain/loss"],
            "retain_base_loss": final["retain/base_loss"], "retain_loss_delta": final["retain/loss_delta"],
            "retain_kl": final["retain/kl"], "domain_loss_at_step_0": evals[0]["loss"], "evaluations": evals,
            "wall_s": round(seconds, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | domain eval loss | retention loss | Δ retention vs base | KL to base (nats/token) |",
             "|---|---:|---:|---:|---:|"]
    base = rows[0]
    lines.append(f"| base (step 0) | {base['domain_loss_at_step_0']:.4f} | {base['retain_base_loss']:.4f} | — | 0 |")
    for r in rows:
        lines.append(f"| {r['setting']} | {r['domain_loss']:.4f} | {r['retain_loss']:.4f} | "
                     f"{r['retain_loss_delta']:+.4f} | {r['retain_kl']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forgetting", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Model folder (default: the SmolLM2 fixture, tools.fixtures).")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"Comma-separated, of {', '.join(SETTINGS)}.")
    p.add_argument("--steps", type=int, default=40, help="Optimizer steps per setting (default: 40).")
    p.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate (default: 2e-3).")
    p.add_argument("--eval-every", type=int, default=20, help="Evaluate every N steps (default: 20).")
    p.add_argument("--replay-ratio", type=float, default=0.25, help="replay settings: --replay-ratio (default 0.25).")
    p.add_argument("--kl-to-base", type=float, default=0.5, help="kl settings: --kl-to-base (default 0.5).")
    p.add_argument("--seed", type=int, default=42, help="Seed of every setting (default: 42).")
    p.add_argument("--out", default="runs/forgetting", help="Folder of the runs and of engine.eval's output.")
    p.add_argument("--results", default=str(RESULTS_DIR), help="Folder of the JSON (default: bench/results).")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        p.error(f"--settings: {', '.join(unknown) or 'none given'}: expected some of {', '.join(SETTINGS)}")
    if args.model is None:
        from tools.fixtures import smollm2_dir

        args.model = str(smollm2_dir())
    rows = [run_setting(name, args, args.model) for name in names]
    eval_out = Path(args.out) / "eval"
    eval_main(["--model", args.model, *sum((["--adapter", r["adapter"]] for r in rows), []),
               "--data", str(EXAMPLES / "license_qa_eval.jsonl"), "--general", str(EXAMPLES / "general_text.jsonl"),
               "--max-len", "256", "--out", str(eval_out), *(["--no-progress"] if args.no_progress else [])])
    table = markdown(rows)
    print(table)
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"forgetting-{env['device']}-{env['date'].replace(':', '').replace('+0000', 'Z')}.json"
    payload = {"bench": "forgetting", "environment": env,
               "setup": {"model": args.model, "steps": args.steps, "lr": args.lr, "eval_every": args.eval_every,
                         "seed": args.seed, "data": "examples/license_qa.jsonl",
                         "eval_data": "examples/license_qa_eval.jsonl", "retain_data": "examples/general_text.jsonl"},
               "results": rows, "table": table, "engine_eval": json.loads((eval_out / "eval.json").read_text())}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} and {eval_out}/eval.md, eval_tradeoff.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
