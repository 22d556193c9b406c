"""Check our GGUF export against llama.cpp itself (through llama-cpp-python).

    python -m bench.verify_gguf --model M [--adapter A] [--json bench/results/gguf-verify.json]

Exports the model (``engine.export``) as F32, F16 and Q8_0, and with ``--adapter`` also the merged
model (F16) and the adapter as a LoRA GGUF, loads each file in ``llama_cpp.Llama`` (CPU,
``logits_all``), and compares it with our own model (fp32, the adapter applied unmerged) on a few
prompts fed as the same token ids:

* max |logit difference| over every position of every prompt: against our fp32 model; against
  our model on the weights read back from the GGUF file (`tools.gguf_to_hf`: the values llama.cpp
  holds), which leaves only llama.cpp's arithmetic (its CPU matmuls round activations to F16 for
  F16 weights, to Q8_0 for Q8_0 weights); and ("file w") ours on the file's weights against ours
  in fp32, the effect of the file's rounding alone. llama.cpp runs with an F32 KV cache (its
  default is F16), so that an F32 file matches to ~1e-4: the file itself is exact;
* greedy continuations of ``--tokens`` tokens: prompts whose continuation is identical, and the
  mean length of the common prefix;
* whether llama.cpp's tokenizer, read from the GGUF, gives our tokenizer's ids for each prompt.

llama_cpp is a reference library, imported here only (never by engine/ or tools/):
``pip install llama-cpp-python`` (a CPU build compiles llama.cpp: a compiler and cmake, several
minutes) if it is missing.
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
    max_abs_logit_diff_vs_file: float  # against our model on the weights read back from the GGUF
    file_weights_effect: float  # max |logit diff| of our model on the file's weights vs our fp32 model
    max_abs_logit: float  # the scale of the logits
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


def compare(llama_cpp, gguf_file: Path, label: str, reference: str, model, from_file, tok, prompts, n_tokens: int,
            lora: Path | None = None) -> Row:
    """``model``: ours (fp32); ``from_file``: ours on the GGUF's weights (+ the same adapter)."""
    # An F32 KV cache (llama.cpp's default is F16), so that the figures show the file, not the cache.
    llm = llama_cpp.Llama(model_path=str(gguf_file), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=512, n_threads=2, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    diff = diff_file = effect = scale = 0.0
    same = prefix = tok_same = 0
    for text in prompts:
        ids = tok.encode(text)
        tok_same += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        cpp, ours = _cpp_logits(llm, ids), _our_logits(model, ids)
        diff = max(diff, float(np.abs(cpp - ours).max()))
        on_file = _our_logits(from_file, ids)
        diff_file = max(diff_file, float(np.abs(cpp - on_file).max()))
        effect = max(effect, float(np.abs(on_file - ours).max()))
        scale = max(scale, float(np.abs(ours).max()))
        ours, theirs = _our_greedy(model, ids, n_tokens), _cpp_greedy(llm, ids, n_tokens)
        same += ours == theirs
        prefix += _common_prefix(ours, theirs)
    llm.close()
    return Row(label, reference, diff, diff_file, effect, scale, same, len(prompts), prefix / len(prompts), n_tokens, tok_same)


def read_back(gguf_file: Path, work: Path, adapter: str | None = None):
    """Our model on the weights of ``gguf_file`` (dequantized by `tools.gguf_to_hf`), + ``adapter``."""
    import models
    from engine.adapters import load_adapter
    from tools.gguf_to_hf import convert_gguf

    folder = convert_gguf(gguf_file, work / f"{gguf_file.stem}-hf")
    model = models.load_model(folder, dtype=torch.float32)
    if adapter:
        load_adapter(model, adapter)
    return model.eval()


def print_table(rows: list[Row]) -> None:
    head = f"{'file':<16} {'ours':<13} {'max|logit|':>10} {'max|dlogit|':>11} {'vs file w':>9} {'file w':>8} " \
           f"{'greedy same':>11} {'mean prefix':>11} {'tokenizer':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.file:<16} {r.reference:<13} {r.max_abs_logit:>10.2f} {r.max_abs_logit_diff:>11.2e} "
              f"{r.max_abs_logit_diff_vs_file:>9.2e} {r.file_weights_effect:>8.2e} "
              f"{f'{r.greedy_identical}/{r.prompts}':>11} {f'{r.mean_common_prefix:.1f}/{r.tokens}':>11} "
              f"{f'{r.tokenizer_identical}/{r.prompts}':>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.verify_gguf", description=__doc__.split("\n\n")[0])
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
        files = {t: work / f"model-{t}.gguf" for t in ("f32", "f16", "q8_0")}
        rows = []
        for t, f in files.items():
            export_model(args.model, [], f, t, overwrite=True)
            rows.append(compare(llama_cpp, f, t.upper(), "base", base, read_back(f, work), tok, PROMPTS,
                                args.tokens))
        if args.adapter:
            adapted = models.load_model(args.model, dtype=torch.float32)
            load_adapter(adapted, args.adapter)
            adapted.eval()
            merged = work / "merged-f16.gguf"
            export_model(args.model, [args.adapter], merged, "f16", overwrite=True)
            lora = work / "adapter-f32.gguf"
            export_lora(args.model, args.adapter, lora, "f32", overwrite=True)
            rows.append(compare(llama_cpp, merged, "merged F16", "base+adapter", adapted, read_back(merged, work),
                                tok, PROMPTS, args.tokens))
            rows.append(compare(llama_cpp, files["f16"], "F16 + LoRA GGUF", "base+adapter", adapted,
                                read_back(files["f16"], work, args.adapter), tok, PROMPTS, args.tokens, lora=lora))
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
