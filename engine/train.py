"""``python -m engine.train``: fine-tune a Llama-family model with LoRA or QLoRA.

    python -m engine.train --model llama2-7b --data legal.jsonl
    python -m engine.train --model ./my-model --data train.jsonl --quant nf4 --output runs/qlora
    python -m engine.train --config run.toml --lr 1e-4        # flags override the TOML file
    python -m engine.train --method dpo --model M --data prefs.jsonl --init-adapter runs/sft/adapter

Exit status: 0 done; 2 bad input (one line on stderr, nothing half-written); 3 diverged
(too many non-finite steps in a row); 75 stopped by SIGTERM after saving a checkpoint
(continue with --resume).
"""

from __future__ import annotations

import sys

from engine.config import parse_config
from engine.errors import run_cli

DESCRIPTION = ("Fine-tune a Llama-family model with LoRA (or QLoRA with --quant nf4), by SFT or DPO. Writes the PEFT-format "
               "adapter to OUTPUT/adapter, metrics to OUTPUT/metrics.jsonl and the loss curve to OUTPUT/loss.png.")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, prog="python -m engine.train", description=DESCRIPTION)
    # heavy imports only after the flags are known to be valid
    if cfg.method == "dpo":
        from engine.dpo import DPOTrainer as Trainer
    else:
        from engine.sft import SFTTrainer as Trainer

    trainer = Trainer(cfg)
    trainer.setup()
    print(f"model {cfg.model}: {trainer.num_trainable:,} trainable LoRA parameters; "
          f"{len(trainer.data.train)} training samples, {len(trainer.data.eval)} eval samples; "
          f"{trainer.total_steps} steps", file=sys.stderr)
    for report in (trainer.data.train_report, trainer.data.eval_report):
        if report is not None:
            print(f"data: {report.summary()}", file=sys.stderr)
    result = trainer.train()
    if result:
        print(f"final {trainer.eval_summary(result)}", file=sys.stderr)
    print(f"adapter written to {trainer.output / 'adapter'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
