"""Compare a base model with its adapters: domain gain and forgetting, as a table, JSON and a chart.

    python -m engine.eval --model BASE --adapter A [--adapter NAME=B ...] --data domain.jsonl \\
        [--general general.jsonl] [--out DIR]
    python -m engine.eval --reward-model RUN/adapter --data prefs.jsonl [--model BASE] [--out DIR]
    python -m engine.eval --model BASE --adapter A [...] --data prompts.jsonl --reward number [--out DIR]

For the base and for each adapter: the mean loss per trainable token and the perplexity on the
domain set (SFT data in any format `engine.train` reads; only completion / assistant tokens count)
and on general text (``{"text": ...}`` lines, every token counts: a rise there against the base is
forgetting), where each adapter's mean KL(base ‖ adapter) per token is measured too
(`engine.kl_to_base`). The base is loaded once; the adapters are read and checked against its
shapes before any weight is loaded, then applied one after the other (see `engine.comparison`).
Writes ``OUT/eval.md`` (the markdown table, also printed), ``OUT/eval.json`` and ``OUT/eval.png``
(losses as bars); with ``--general`` also ``OUT/eval_tradeoff.png``: domain gain against
forgetting, one point per adapter, a chain of runs (``--init-adapter``) drawn as a path
(`engine.tradeoff`).

Rows are named ``base`` and, per ``--adapter``, by its folder path (``--adapter DIR``) or by NAME
(``--adapter NAME=DIR``); ``--adapter none`` stands for the base row, which is always the first
(every Δ column is against it), so it adds no row: ``--adapter none`` alone measures the base.

With ``--reward-model`` it measures a reward model (``--method reward``) instead: its held-out
pairwise accuracy and mean margin on the preference pairs of ``--data`` (`engine.reward_eval`);
``--model`` then defaults to the base the reward model records.

With ``--reward SPEC ...`` it compares the base and the adapters by the mean reward of their greedy
completions to the prompts of ``--data`` (a GRPO run's measure, `engine.prompt_eval`).
"""

from __future__ import annotations

from pathlib import Path

from engine.cli import ArgumentParser
from engine.comparison import Row, compare, markdown_table, read_adapters, rows_to_json
from engine.config import QUANTS
from engine.data.samples import load_samples
from engine.errors import InputError, run_cli
from engine.run.folder import model_files_in, write_json
from engine.run.setup import DTYPES, resolve_device, resolve_dtype, resolve_max_len
from engine.tradeoff import plot_tradeoff, read_node, tradeoff_edges, tradeoff_points
from models import load_model, load_tokenizer
from models.loading import read_config, resolve_model_dir

DOMAIN, GENERAL = "domain", "general"
DATA_FORMATS = ("auto", "text", "completion", "alpaca", "messages", "sharegpt")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m engine.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Base model: a local Hugging Face folder or a preset name. Required, "
                   "except with --reward-model (default: the base it records).")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="A PEFT-format adapter folder for this base; repeat for several. NAME=DIR names its row "
                   "NAME (default: the folder path); 'none' is the base row, which is always there.")
    p.add_argument("--data", required=True, help="Domain evaluation set (JSONL/JSON, SFT formats); with "
                   "--reward-model, preference pairs. Required.")
    p.add_argument("--reward-model", default=None, metavar="DIR",
                   help="A reward model folder (the adapter of --method reward): report its pairwise accuracy on "
                   "the preference pairs of --data instead of comparing adapters.")
    p.add_argument("--reward", nargs="+", action="extend", default=None, metavar="SPEC",
                   help="Reward functions (as engine.train's --reward: exact, number, regex:PATTERN, "
                   "json-schema:FILE, module:function, file.py:function): --data holds prompts, and each model "
                   "(base, adapters) is measured by the mean reward of its greedy completions.")
    p.add_argument("--reward-weights", nargs="+", type=float, action="extend", default=None, metavar="W",
                   help="With --reward: the weight of each function in the total (default: 1 each).")
    p.add_argument("--max-completion-len", type=int, default=256,
                   help="With --reward: most new tokens per completion (default: 256).")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS, help="Format of --data (default: detect).")
    p.add_argument("--general", default=None, help="General text ({\"text\": ...} lines) for the forgetting check: "
                   "loss and KL to the base on it, and the trade-off chart.")
    p.add_argument("--out", default="outputs/eval", help="Folder for eval.md, eval.json, eval.png and, with "
                   "--general, eval_tradeoff.png (default: outputs/eval; those files are replaced, nothing else).")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per batch; pairs with --reward-model "
                   "(default: 4).")
    p.add_argument("--max-len", type=int, default=None,
                   help="Truncate samples to this many tokens (default: min(model context, 2048)).")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="Compute dtype (default auto: bf16 on a GPU, fp32 on a CPU).")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto).")
    p.add_argument("--quant", default="none", choices=QUANTS,
                   help="Quantize the base as the adapter was trained: nf4 (QLoRA), int8 or fp8 (default: none).")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return p


def plot(rows: list[Row], set_names: list[str], png: Path) -> None:
    """Grouped bars: one group per evaluation set, one bar per row (base, adapters), loss in nats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * len(set_names) * len(rows) ** 0.5, 4), dpi=120)
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(set_names))]
        losses = [row.results[s].loss for s in set_names]
        bars = ax.bar(xs, losses, width, label=row.name)
        ax.bar_label(bars, labels=[f"ppl {row.results[s].perplexity:.2f}" for s in set_names], fontsize=7)
    ax.set_xticks(range(len(set_names)), [f"{s} loss" for s in set_names])
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.margins(y=0.15)  # room for the perplexity labels above the bars
    # the legend goes under the axes, never over the bars
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(rows), 3), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def check_out(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) that does not hold a model."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder (eval.md, eval.json and eval.png go in a folder)")
    if out.is_dir() and model_files_in(out):
        raise InputError(f"--out {out}: holds a model ({', '.join(model_files_in(out)[:3])}); choose another folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: expected at least 1")
    if args.max_len is not None and args.max_len < 2:
        raise InputError(f"--max-len {args.max_len}: expected at least 2")
    out = Path(args.out)
    check_out(out)
    if args.reward_model is not None:
        from engine import reward_eval

        return reward_eval.main(args, out)
    if args.model is None:
        raise InputError("--model is required (a local folder or a preset name), unless --reward-model is given")
    if args.reward:
        from engine import prompt_eval

        return prompt_eval.main(args, out)
    if args.reward_weights:
        raise InputError("--reward-weights applies with --reward")
    # Everything the user can get wrong is checked before the weights are loaded.
    model_dir = resolve_model_dir(args.model)
    max_len = resolve_max_len(args.max_len, read_config(model_dir))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    adapters = read_adapters(args.adapter, model_dir)
    nodes = [read_node(a.name, a.path) for a in adapters] if args.general else []  # for the trade-off chart
    tokenizer = load_tokenizer(model_dir)
    sets, reports = {}, {}
    sets[DOMAIN], reports[DOMAIN] = load_samples(args.data, tokenizer, format=None if args.format == "auto" else args.format,
                                                 max_len=max_len)
    if args.general:
        sets[GENERAL], reports[GENERAL] = load_samples(args.general, tokenizer, format="text", max_len=max_len)
    for report in reports.values():
        print(report.summary())

    model = load_model(model_dir, dtype=dtype, device=device, quantize=None if args.quant == "none" else args.quant)
    rows = compare(model, adapters, sets, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id,
                   device=device, progress=not args.no_progress, kl_set=GENERAL if args.general else None)

    table = markdown_table(rows, list(sets))
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "data": args.data, "general": args.general, "adapters": args.adapter,
              "dtype": str(dtype).removeprefix("torch."), "quant": args.quant, "max_len": max_len,
              "data_reports": {k: r.__dict__ for k, r in reports.items()}, "rows": rows_to_json(rows)}
    plot(rows, list(sets), out / "eval.png")
    written = [out / "eval.md", out / "eval.json", out / "eval.png"]
    if args.general:
        plot_tradeoff(tradeoff_points(rows, DOMAIN, GENERAL), tradeoff_edges(nodes), out / "eval_tradeoff.png")
        written.append(out / "eval_tradeoff.png")
    write_json(out / "eval.json", result)
    (out / "eval.md").write_text(table + "\n")
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
