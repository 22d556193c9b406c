"""The reference side of the comparisons with HF PEFT: transformers' model of a folder, and the
token ids every comparison feeds (2 rows of 9 in the tiny model's 97-token vocabulary)."""

import torch
import transformers


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))
