"""Check our GGUF export against llama.cpp itself (through llama-cpp-python).

    python -m tools.verify_gguf --model M [--adapter A] [--json bench/results/gguf-verify.json]

Exports the model (``engine.export``) as F16 and Q8_0, and with ``--adapter`` also the merged
model (F16) and the adapter as a LoRA GGUF, loads each file in ``llama_cpp.Llama`` (CPU,
``logits_all``), and compares it with our own model (fp32, the adapter applied unmerged) on a few
prompts fed as the same token ids:

* max |logit difference| over every position of every prompt (F16 target: <= 1e-2 relative to
  our model with its weights rounded to F16 as llama.cpp sees them; the figure against fp32 is
  printed too);
* greedy continuations of ``--tokens`` tokens: prompts whose continuation is identical, and the
  mean length of the common prefix;
* whether llama.cpp's tokenizer, read from the GGUF, gives our tokenizer's ids for each prompt.

llama_cpp is imported here only, never by the engine: ``pip install llama-cpp-python`` (a CPU
build compiles llama.cpp: a compiler and cmake, several minutes) if it is missing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "In 1492, Columbus sailed across the Atlantic Ocean and",
]


@dataclass
class Row:
    file: str
    reference: str
    max_abs_logit_diff: float
    max_abs_logit_diff_vs_rounded: float | None  # against our model with F16-rounded weights
    greedy_identical: int
    prompts: int
    mean_common_prefix: float
    tokens: int
    tokenizer_identical: int


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama_cpp is not installed: `pip install llama-cpp-python` (builds llama.cpp for the "
                         "CPU; needs a C++ compiler and cmake), or install a prebuilt wheel of it") from None
    return llama_cpp


@torch.no_grad()
def _our_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].float().numpy()


@torch.no_grad()
def _our_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def _cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(llama_cpp, gguf_file: Path, label: str, reference: str, model, rounded, tok, prompts, n_tokens: int,
            lora: Path | None = None) -> Row:
    llm = llama_cpp.Llama(model_path=str(gguf_file), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=512, n_threads=2, verbose=False)
    diff = diff_rounded = 0.0
    same = prefix = tok_same = 0
    for text in prompts:
        ids = tok.encode(text)
        tok_same += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        cpp = _cpp_logits(llm, ids)
        diff = max(diff, float(np.abs(cpp - _our_logits(model, ids)).max()))
        if rounded is not None:
            diff_rounded = max(diff_rounded, float(np.abs(cpp - _our_logits(rounded, ids)).max()))
        ours, theirs = _our_greedy(model, ids, n_tokens), _cpp_greedy(llm, ids, n_tokens)
        same += ours == theirs
        prefix += _common_prefix(ours, theirs)
    llm.close()
    return Row(label, reference, diff, diff_rounded if rounded is not None else None, same, len(prompts),
               prefix / len(prompts), n_tokens, tok_same)


def _rounded_to_f16(model):
    """A copy of ``model`` whose weight matrices are rounded to F16 (norms stay fp32, as in the GGUF)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return twin


def print_table(rows: list[Row]) -> None:
    head = f"{'file':<24} {'reference':<22} {'max|dlogit|':>11} {'vs F16 w':>9} {'greedy same':>11} " \
           f"{'mean prefix':>11} {'tokenizer':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = f"{r.max_abs_logit_diff_vs_rounded:.2e}" if r.max_abs_logit_diff_vs_rounded is not None else "-"
        print(f"{r.file:<24} {r.reference:<22} {r.max_abs_logit_diff:>11.2e} {vs:>9} "
              f"{f'{r.greedy_identical}/{r.prompts}':>11} {f'{r.mean_common_prefix:.1f}/{r.tokens}':>11} "
              f"{f'{r.tokenizer_identical}/{r.prompts}':>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.verify_gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format model folder or preset")
    p.add_argument("--adapter", help="a PEFT LoRA adapter: also check the merged GGUF and the LoRA GGUF")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--json", help="write the results to this JSON file (e.g. bench/results/gguf-verify.json)")
    p.add_argument("--workdir", help="folder for the GGUF files (default: a temporary folder)")
    args = p.parse_args(argv)
    llama_cpp = _import_llama_cpp()

    import models
    from engine.adapters import load_adapter
    from engine.export import export_lora, export_model

    tok = models.load_tokenizer(models.resolve_model_dir(args.model))
    base = models.load_model(args.model, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = {t: work / f"model-{t}.gguf" for t in ("f16", "q8_0")}
        for t, f in files.items():
            export_model(args.model, [], f, t, overwrite=True)
        rounded = _rounded_to_f16(base)
        rows = [compare(llama_cpp, files["f16"], "F16", "base fp32", base, rounded, tok, PROMPTS, args.tokens),
                compare(llama_cpp, files["q8_0"], "Q8_0", "base fp32", base, None, tok, PROMPTS, args.tokens)]
        if args.adapter:
            adapted = models.load_model(args.model, dtype=torch.float32).eval()
            load_adapter(adapted, args.adapter)
            adapted.eval()
            merged = work / "merged-f16.gguf"
            export_model(args.model, [args.adapter], merged, "f16", overwrite=True)
            lora = work / "adapter-f32.gguf"
            export_lora(args.model, args.adapter, lora, "f32", overwrite=True)
            rows.append(compare(llama_cpp, merged, "merged F16", "base+adapter fp32", adapted, None, tok, PROMPTS,
                                args.tokens))
            rows.append(compare(llama_cpp, files["f16"], "F16 + LoRA GGUF", "base+adapter fp32", adapted, None, tok,
                                PROMPTS, args.tokens, lora=lora))
    print_table(rows)
    if args.json:
        from bench.common import environment

        out = {"bench": "gguf-verify", "environment": environment("cpu"),
               "setup": {"model": args.model, "adapter": args.adapter, "tokens": args.tokens, "prompts": PROMPTS,
                         "llama_cpp_python": llama_cpp.__version__},
               "results": [asdict(r) for r in rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
