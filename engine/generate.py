"""Text generation with the KV cache: greedy or top-p sampling, streamed to stdout.

    python -m engine.generate --model NAME_OR_DIR [--adapter DIR] --prompt TEXT [--chat]
                              [--max-new-tokens N] [--temperature T --top-p P] [--seed S]
                              [--dtype fp32|bf16|fp16] [--quant nf4]
    python -m engine.generate --model BASE --adapter math=DIR_A --adapter code=DIR_B \\
        --prompt "2+2=" --prompt-adapter math --prompt "def f():" --prompt-adapter code \\
        --prompt "Hello" --prompt-adapter none [--prompts FILE.jsonl]

``--adapter`` applies a PEFT-format adapter (ours or made elsewhere) on top of the base, unmerged:
the same tokens as generating from the folder `engine.merge` writes (greedy, same dtype).

The prompt is run once through the model (prefill, filling the cache), then one token per step
attends to the cache. Generation stops at any end-of-sequence id (the config's and the tokenizer's,
incl. generation_config.json) or after N new tokens.

Several adapters over one base. ``--adapter NAME=DIR`` (repeatable; a plain ``DIR`` is named by
its folder name; ``none`` is the base) declares adapters; each prompt picks one with
``--prompt-adapter NAME`` (paired in order with ``--prompt``) or the ``"adapter"`` field of its
``--prompts`` line (``{"prompt": ..., "adapter": NAME or "none"}``); with a single ``--adapter``
every prompt uses it. Several prompts are generated in ONE batch (left-padded, one KV cache,
`engine.sampling.sample_completions`), each row with its own adapter (`engine.adapters.multi`:
the gathered low-rank product `kernels.lora_gather`), and printed as one JSON line per prompt,
``{"index", "adapter", "prompt", "text"}``, in prompt order. Greedy in fp32, each row's tokens
are those of generating its prompt alone with its adapter (in bf16/fp16 the batch's other
rounding can flip a near-tie); sampling draws the rows from one generator (so other draws than
alone). A single prompt streams its text as before.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cli import ArgumentParser
from engine.config import QUANTS
from engine.data.reading import read_records
from engine.errors import InputError, run_cli
from engine.run.setup import DTYPES, resolve_device
from engine.adapters.multi import NONE, AdapterSpec, adapter_specs
from engine.sampling import sample_completions, sample_next_tokens
from models.llama import LlamaForCausalLM


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Next token from logits (V,): argmax when temperature == 0, else nucleus sampling from
    softmax(logits / T) restricted to the smallest prefix (by probability) whose mass reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(sample_next_tokens(logits[None], temperature, top_p, generator)[0])  # (1, V) -> one token


@torch.inference_mode()
def generate(model: LlamaForCausalLM, input_ids: torch.Tensor | list[int], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_ids: Iterable[int] = (),
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids for one prompt (T,) or (1, T); an eos id is
    yielded and ends the stream."""
    device = model.model.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)  # (1, T)
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty: nothing to condition generation on")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p={top_p}: expected 0 < top_p <= 1")
    eos = set(eos_token_ids)
    cache = model.new_cache(batch_size=1, max_len=ids.shape[1] + max_new_tokens)
    logits = model(ids, cache=cache)[0, -1]  # prefill: (V,) for the last prompt token
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        yield token
        if token in eos:
            return
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]  # (V,)


class TextStream:
    """Incremental detokenisation: `push` returns the newly completed text, holding back a trailing
    U+FFFD (a UTF-8 character whose bytes are split across tokens) until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.printed = text[self.printed:], len(text)
        return new


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Model folder, preset name or hub id. Required.")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="A PEFT-format adapter folder applied on top of the model (default: none). Repeat "
                        "as NAME=DIR for several adapters over one base (a plain DIR is named by its folder "
                        "name; 'none' is the base); each prompt then picks one (--prompt-adapter, --prompts).")
    parser.add_argument("--prompt", action="append", default=[],
                        help="Prompt text. Repeat for several prompts, generated in one batch (one JSON line "
                        "each). Required unless --prompts is given.")
    parser.add_argument("--prompt-adapter", action="append", default=[], metavar="NAME",
                        help="The adapter (a NAME of --adapter, or none) of each --prompt, paired in order; "
                        "needed with several --adapter.")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help='JSONL prompts, one {"prompt": TEXT, "adapter": NAME or "none"} a line ("adapter" '
                        "optional with at most one --adapter), after the --prompt ones.")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt as a user turn in the chat template.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Maximum new tokens (default: 128).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass in (0, 1] (default: 1.0).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Compute dtype (default: fp32).")
    parser.add_argument("--quant", default="none", choices=QUANTS,
                        help="Quantize the base as the adapter was trained: nf4 (QLoRA), int8 or fp8 (default: none).")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or "
                        "cuda:N (default: auto).")
    return parser


def check_sampling(args) -> None:
    """Sampling flags no generation can use: InputError naming the flag."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise InputError(f"--temperature {args.temperature}: expected a finite number >= 0 (0 = greedy)")
    if not (math.isfinite(args.top_p) and 0.0 < args.top_p <= 1.0):
        raise InputError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    if not 0 <= args.seed < 2**63:
        raise InputError(f"--seed {args.seed}: expected 0 <= seed < 2**63")


@dataclass(frozen=True)
class Job:
    """One prompt to generate for, and the adapter it uses (a name of --adapter, or none)."""

    prompt: str
    adapter: str


def declared_adapters(specs: list[AdapterSpec]) -> dict[str, Path | None]:
    """Name -> folder of every --adapter (none -> None); a plain DIR is named by its folder name."""
    named: dict[str, Path | None] = {}
    for spec in specs:
        name = spec.name if spec.name is not None else (spec.path.name or spec.path.resolve().name)
        if name in named:
            raise InputError(f"--adapter: two adapters are named {name!r}; name them with NAME=DIR")
        named[name] = spec.path
    return named


def read_prompt_file(path: str) -> list[tuple[str, str | None]]:
    """(prompt, adapter or None) per record of a --prompts JSONL (or JSON array) file, read by
    `engine.data.reading.read_records`; InputError naming FILE:LINE."""
    out = []
    for record in read_records(path):
        value = record.value
        if not isinstance(value.get("prompt"), str):
            raise InputError(f'{path}:{record.where}: expected {{"prompt": TEXT, "adapter": NAME}} (adapter optional)')
        adapter = value.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise InputError(f"{path}:{record.where}: \"adapter\" must be a name or \"none\", got {adapter!r}")
        out.append((value["prompt"], adapter))
    return out


def plan_jobs(args, named: dict[str, Path | None]) -> list[Job]:
    """The prompts in order (--prompt, then --prompts lines), each with its adapter."""
    if args.prompt_adapter and len(args.prompt_adapter) != len(args.prompt):
        raise InputError(f"--prompt-adapter is given {len(args.prompt_adapter)} times for {len(args.prompt)} "
                         "--prompt; give one per prompt, in order")
    given = list(zip(args.prompt, args.prompt_adapter or [None] * len(args.prompt)))
    if args.prompts is not None:
        given += read_prompt_file(args.prompts)
    if not given:
        raise InputError("no prompt: give --prompt TEXT or --prompts FILE")
    default = next(iter(named)) if len(named) == 1 else NONE if not named else None
    jobs = []
    for index, (prompt, adapter) in enumerate(given):
        adapter = default if adapter is None else adapter
        if adapter is None:
            raise InputError(f"prompt {index}: {len(named)} adapters are given ({', '.join(named)}); say which one "
                             "each prompt uses (--prompt-adapter NAME, or \"adapter\" in --prompts)")
        if adapter != NONE and adapter not in named:
            choices = [*(n for n in named if n != NONE), NONE]
            raise InputError(f"prompt {index}: unknown adapter {adapter!r}; the adapters are {', '.join(choices)}")
        jobs.append(Job(prompt, adapter))
    return jobs


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_sampling(args)
    named = declared_adapters(adapter_specs(args.adapter))
    jobs = plan_jobs(args, named)
    device = resolve_device(args.device)

    from engine.adapters import load_adapted_model
    from models import load_tokenizer, resolve_model_dir
    from models.loading import read_config

    model_dir = resolve_model_dir(args.model)
    context = read_config(model_dir).max_position_embeddings
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [encode(tokenizer, job.prompt, args.chat) for job in jobs]
    for index, ids in enumerate(prompt_ids):
        where = "the prompt's" if len(jobs) == 1 else f"prompt {index}'s"
        if not ids:
            raise InputError(f"{'the prompt' if len(jobs) == 1 else f'prompt {index}'} is empty: nothing to "
                             "condition generation on")
        if len(ids) + args.max_new_tokens > context:
            raise InputError(f"--max-new-tokens {args.max_new_tokens}: {where} {len(ids)} tokens plus "
                             f"{args.max_new_tokens} new ones exceed the model's context of {context} tokens")
    quantize = None if args.quant == "none" else args.quant
    if len(jobs) > 1:
        return generate_batch(args, jobs, prompt_ids, named, model_dir, tokenizer, device, quantize)
    model = load_adapted_model(model_dir, named.get(jobs[0].adapter), quantize=quantize, dtype=DTYPES[args.dtype],
                               device=device)
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = TextStream(tokenizer)
    for token in generate(model, prompt_ids[0], args.max_new_tokens, args.temperature, args.top_p, eos, generator):
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    return 0


def generate_batch(args, jobs: list[Job], prompt_ids: list[list[int]], named: dict[str, Path | None], model_dir,
                   tokenizer, device, quantize) -> int:
    """Every prompt in one left-padded batch, each row with its adapter; one JSON line per prompt."""
    from engine.adapters import check_adapter_fits, read_adapter
    from engine.adapters.multi import inject_adapters
    from models import load_model
    from models.loading import read_config

    used = list(dict.fromkeys(job.adapter for job in jobs if job.adapter != NONE))  # in order of first use
    adapters = [read_adapter(named[name], name=name) for name in used]
    with torch.device("meta"):  # every adapter checked against the base's shapes before any weight loads
        skeleton = LlamaForCausalLM(read_config(model_dir))
    for adapter in adapters:
        check_adapter_fits(skeleton, adapter)
    model = load_model(model_dir, quantize=quantize, dtype=DTYPES[args.dtype], device=device).eval()
    selection = contextlib.nullcontext()
    if adapters:
        selection = inject_adapters(model, adapters).selected([job.adapter for job in jobs])
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.inference_mode(), selection:
        completions = sample_completions(model, prompt_ids, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p, eos_token_ids=eos,
                                         generator=generator, pad_id=pad_id)
    for index, (job, tokens) in enumerate(zip(jobs, completions)):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(json.dumps({"index": index, "adapter": job.adapter, "prompt": job.prompt, "text": text},
                         ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
