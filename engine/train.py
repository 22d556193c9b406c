"""``python -m engine.train``: fine-tune a Llama-family model with LoRA or QLoRA.

    python -m engine.train --model llama2-7b --data legal.jsonl
    python -m engine.train --model ./my-model --data train.jsonl --quant nf4 --output runs/qlora
    python -m engine.train --config run.toml --lr 1e-4        # flags override the TOML file
    python -m engine.train --method dpo --model M --data prefs.jsonl --init-adapter runs/sft/adapter
    python -m engine.train --method grpo --model M --data prompts.jsonl --reward number --init-adapter runs/sft/adapter
    python -m engine.train --method reward --model M --data prefs.jsonl --eval-data prefs_eval.jsonl

Each ``--method NAME`` is the recipe ``engine.recipes.NAME`` (``train(cfg, progress)``).

Exit status (also in --help): 0 done; 2 bad input (one line on stderr, nothing half-written);
3 diverged (non-finite steps in a row, no successful step, or a non-finite adapter); 74 an I/O
error such as a full disk; 75 stopped by SIGTERM after saving a checkpoint (continue with --resume).
"""

from __future__ import annotations

import importlib
import sys

from engine.cli import parse_config
from engine.errors import run_cli

DESCRIPTION = ("Fine-tune a Llama-family model with LoRA (or QLoRA with --quant nf4): by SFT or DPO, a reward "
               "model (--method reward), or online from rewards (--method grpo: GRPO, Dr. GRPO or RLOO with "
               "--grpo-loss, graded by --reward functions or a --reward-model). Writes the PEFT-format adapter to "
               "OUTPUT/adapter, metrics to OUTPUT/metrics.jsonl and the loss curve to OUTPUT/loss.png.")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, prog="python -m engine.train", description=DESCRIPTION)
    recipe = importlib.import_module(f"engine.recipes.{cfg.method}")  # heavy imports once the flags are valid
    run = recipe.train(cfg, progress=True)
    if not run.parallel.is_main:  # under torchrun rank 0 speaks for the job
        return 0
    if run.eval_summary:
        print(f"final {run.eval_summary}", file=sys.stderr)
    for warning in run.warnings:  # given during the run, repeated where the user looks last
        print(f"warning: {warning}", file=sys.stderr)
    note = run.forgetting.adapter_note(run.step) if run.forgetting is not None else ""
    print(f"adapter written to {run.output / 'adapter'}{note}", file=sys.stderr)
    from engine.adapters.vllm_rules import check_vllm  # whether vLLM serves it as LoRA, and how
    print(f"serving: {check_vllm(run.output / 'adapter').summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
