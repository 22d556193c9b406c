"""A training step reads nothing on the host: three steps of the SmolLM2 fixture (SFT with LoRA
and QLoRA, SFT with replay and the KL anchor, DPO and the reward model with LoRA) under a `TorchDispatchMode` that counts every op that makes the host wait for a tensor's
value — zero in the steps that do not log, one (the copy of the pending figures) in the step that
does.

Counted: ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()`` of a
tensor), the ops whose output size depends on values (``nonzero``, ``unique``, ``masked_select``,
indexing by a boolean mask: each a device sync on a GPU), ``is_nonzero`` / ``equal``, and copies
to the CPU (``_to_copy`` with ``device=cpu``). On a CPU a few host reads leave no op behind
(``.tolist()`` and ``.cpu()`` of a CPU tensor): the engine's one read of the pending figures
copies explicitly (`engine.run.pending.read_on_host`), so it is seen here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import TrainConfig
from engine.recipes import dpo, reward, sft
from engine.run.session import Run

ROOT = Path(__file__).resolve().parents[3]
aten = torch.ops.aten
VALUE_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
                   aten.equal.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_consecutive.default, aten.unique_dim.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class HostReads(TorchDispatchMode):
    """Counts, by op name, the host reads of the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and _bool_index(args)
        if func in VALUE_DEPENDENT or to_cpu or bool_index:
            self.reads[str(func)] += 1
        return func(*args, **kwargs)


def first_lines(src: str, n: int, folder: Path) -> Path:
    out = folder / src
    out.write_text("\n".join((ROOT / "examples" / src).read_text().splitlines()[:n]) + "\n")
    return out


@pytest.mark.parametrize("method,quant", [("sft", "none"), ("sft", "nf4"), ("dpo", "none"), ("reward", "none"),
                                          ("sft-mitigated", "none")])
def test_steps_read_the_host_only_when_they_log(smollm2_dir, tmp_path, monkeypatch, method, quant):
    """``sft-mitigated``: SFT with replay samples mixed in and the KL anchor (`sft.mitigated_step`)."""
    mitigations = {}
    if method == "sft-mitigated":
        method = "sft"
        mitigations = dict(replay_data=str(first_lines("general_replay.jsonl", 4, tmp_path)), replay_ratio=0.5,
                           kl_to_base=0.1)
    recipe = {"sft": sft, "dpo": dpo, "reward": reward}[method]
    data = first_lines("license_qa.jsonl" if method == "sft" else "license_prefs.jsonl", 6, tmp_path)
    per_step: dict[int, Counter] = {}
    step_name = "mitigated_step" if mitigations else "train_step"
    train_step, end_step = getattr(recipe, step_name), Run.end_step

    def counted(step: int, fn, *args):
        with HostReads() as mode:
            result = fn(*args)
        per_step.setdefault(step, Counter()).update(mode.reads)
        return result

    monkeypatch.setattr(recipe, step_name, lambda run, *args: counted(run.step + 1, train_step, run, *args))
    monkeypatch.setattr(Run, "end_step", lambda run, result: counted(run.step + 1, end_step, run, result))
    cfg = TrainConfig(model=str(smollm2_dir), data=str(data), output=str(tmp_path / "run"), method=method,
                      quant=quant, max_steps=3, log_every=3, batch_size=2, max_len=128, lora_r=4, save_every=0,
                      seed=3, **mitigations)
    recipe.train(cfg, progress=False)
    assert sorted(per_step) == [1, 2, 3]
    assert per_step[1] == Counter() and per_step[2] == Counter(), f"host reads in steps that do not log: {per_step}"
    assert sum(per_step[3].values()) == 1, f"the logging step reads the host more than once: {per_step[3]}"
