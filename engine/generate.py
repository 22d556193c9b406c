"""Text generation with the KV cache: greedy or top-p sampling, streamed to stdout.

    python -m engine.generate --model NAME_OR_DIR [--adapter DIR] --prompt TEXT [--chat]
                              [--max-new-tokens N] [--temperature T --top-p P] [--seed S]
                              [--dtype fp32|bf16|fp16] [--quant nf4]

``--adapter`` applies a PEFT-format adapter (ours or made elsewhere) on top of the base, unmerged:
the same tokens as generating from the folder `engine.merge` writes (greedy, same dtype).

The prompt is run once through the model (prefill, filling the cache), then one token per step
attends to the cache. Generation stops at any end-of-sequence id (the config's and the tokenizer's,
incl. generation_config.json) or after N new tokens.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator

import torch

from engine.cli import ArgumentParser
from engine.errors import InputError, run_cli
from engine.run.setup import DTYPES, resolve_device
from engine.sampling import sample_next_tokens
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
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="A PEFT-format adapter folder applied on top of the model (default: none).")
    parser.add_argument("--prompt", required=True, help="Prompt text. Required.")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt as a user turn in the chat template.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Maximum new tokens (default: 128).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass in (0, 1] (default: 1.0).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Compute dtype (default: fp32).")
    parser.add_argument("--quant", default="none", choices=("none", "nf4"),
                        help="Quantize the base to NF4, as a QLoRA adapter was trained (default: none).")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_sampling(args)
    device = resolve_device(args.device)

    from engine.adapters import load_adapted_model
    from models import load_tokenizer, resolve_model_dir
    from models.loading import read_config

    model_dir = resolve_model_dir(args.model)
    context = read_config(model_dir).max_position_embeddings
    tokenizer = load_tokenizer(model_dir)
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
    if len(prompt_ids) + args.max_new_tokens > context:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: the prompt's {len(prompt_ids)} tokens plus "
                         f"{args.max_new_tokens} new ones exceed the model's context of {context} tokens")
    model = load_adapted_model(model_dir, args.adapter, quantize=None if args.quant == "none" else args.quant,
                               dtype=DTYPES[args.dtype], device=device)
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = TextStream(tokenizer)
    for token in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, eos, generator):
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
