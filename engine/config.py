"""The one source of a run's configuration: `TrainConfig`, every field with its type, range and help.

Every option is a dataclass field; its metadata carries the help text and what values it takes
(choices, or a numeric range). The command line is generated from the fields (`engine.cli`:
``lora_r`` -> ``--lora-r``), a TOML file given with ``--config`` only overrides field defaults,
and the command line overrides the file:

    defaults  <  --config FILE.toml  <  command-line flags

One validation path (`check_value`) serves flags, TOML and Python callers: the type (a TOML string
"false" is not a boolean, 4.0 is not an int), finiteness (no NaN or infinity anywhere) and the
range; the message names the flag (and, from a TOML file, its line).

Values that depend on the model or the machine (dtype, max_len, gradient checkpointing) default to
``None`` and are settled once the model config and device are known (`engine.run.setup`); values
that depend on the method (the learning rate) are settled from `METHOD_DEFAULTS` here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from engine.errors import InputError
from models.quantized import FORMATS as BASE_FORMATS

METHODS = ("sft", "dpo", "reward", "grpo")  # each the name of a module in engine/recipes/
GRPO_LOSSES = ("grpo", "dr_grpo", "rloo")  # engine.losses.policy
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")
FORMATS = ("auto", "text", "completion", "alpaca", "messages", "sharegpt")
SCHEDULES = ("cosine", "linear", "constant")
QUANTS = ("none", *BASE_FORMATS)  # nf4, int8, fp8: models.quantized
PEFTS = ("lora", "dora", "ia3", "prefix", "bottleneck")  # engine.adapters.methods
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")  # engine.adapters.lora_init
ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer")  # engine.adapters.bottleneck
LENGTH_POLICIES = ("truncate", "drop", "error")
BATCHINGS = ("padding-free", "padded", "pack")  # engine.data.batching
DTYPES = ("auto", "fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "ddp", "fsdp")  # engine.run.distributed
ON_BUDGET = ("stop", "keep-best")  # engine.run.budget
MAX_SEED = 2**63 - 1
# Defaults that differ by --method, used when the field is left unset (None).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"lr": 2e-4, "lora_dropout": 0.05},
    "dpo": {"lr": 5e-5, "lora_dropout": 0.05},
    "reward": {"lr": 1e-4, "lora_dropout": 0.05},
    "grpo": {"lr": 1e-5, "lora_dropout": 0.0},
}


@dataclass(frozen=True)
class Range:
    """Numeric bounds: ``low`` (inclusive unless ``low_open``) to ``high`` (exclusive if ``high_open``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


POSITIVE = Range(0, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1, high_open=True)


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, range: Range | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "range": range})


@dataclass
class TrainConfig:
    # what to train
    model: str = _opt(None, "Model: a local Hugging Face folder or a preset name (e.g. llama2-7b, smollm2-135m). "
                      "Required.")
    data: str = _opt(None, "Training data: a JSONL or JSON file. Required.")
    method: str = _opt("sft", "Training method.", METHODS)
    format: str = _opt("auto", "Data format; 'auto' detects it from the fields of each file.", FORMATS)
    eval_data: str | None = _opt(None, "Held-out data file for evaluation (same formats as --data).")
    eval_split: float = _opt(0.0, "Fraction of --data held out for evaluation when --eval-data is not given.",
                             range=FRACTION)
    skip_invalid_records: bool = _opt(False, "Skip records with a missing or mistyped field (counted in "
                                      "data_report.json) instead of stopping with an error naming them.")
    output: str = _opt("outputs/run", "Output folder: adapter/, checkpoints/, metrics.jsonl, loss.png.")
    overwrite: bool = _opt(False, "Replace the run in --output (finished or not), once the new run has "
                           "passed its setup. Only a run folder of ours is ever replaced.")
    # DPO (--method dpo)
    dpo_beta: float = _opt(0.1, "DPO: beta, the strength of the KL regularisation towards the reference.",
                           range=POSITIVE)
    dpo_loss: str = _opt("sigmoid", "DPO: loss (sigmoid = DPO, robust, ipo, hinge).", DPO_LOSSES)
    dpo_label_smoothing: float = _opt(0.0, "DPO: label smoothing (sigmoid and robust losses).",
                                      range=Range(0, 0.5, high_open=True))
    precompute_ref: bool = _opt(False, "DPO: compute the reference log-probs once before training.")
    rpo_alpha: float = _opt(0.0, "DPO: weight of the chosen answers' NLL per token added to the loss (RPO; "
                            "TRL's rpo_alpha); it keeps the preferred answers likely. 0 turns it off.",
                            range=AT_LEAST_0)
    dpo_warn_chosen_drop: float = _opt(0.5, "DPO: warn when the chosen answers' log-likelihood has fallen by more "
                                       "than this many nats per token since step 0 while the reward margin "
                                       "grows (likelihood displacement); 0 turns the warning off.",
                                       range=AT_LEAST_0)
    # GRPO (--method grpo)
    num_generations: int = _opt(8, "GRPO: completions sampled per prompt (a group); advantages compare the "
                                "rewards within each group.", range=Range(2))
    max_completion_len: int = _opt(256, "GRPO: most new tokens per sampled completion (sampling stops earlier at "
                                   "an end-of-sequence token).", range=AT_LEAST_1)
    temperature: float = _opt(1.0, "GRPO: sampling temperature of the completions (the policy's log-probs in the "
                              "loss use the same temperature).", range=POSITIVE)
    top_p: float = _opt(1.0, "GRPO: nucleus sampling mass of the completions, in (0, 1].",
                        range=Range(0, 1, low_open=True))
    grpo_loss: str = _opt("grpo", "GRPO: objective: grpo (advantages (r - mean) / std in each group, loss averaged "
                          "per completion), dr_grpo (r - mean, loss summed over tokens / (completions x "
                          "--max-completion-len)) or rloo (leave-one-out baseline, the KL to the reference "
                          "subtracted from the reward).", GRPO_LOSSES)
    epsilon: float = _opt(0.2, "GRPO: clipping range of the importance ratio pi / pi_old, [1 - eps, 1 + eps].",
                          range=POSITIVE)
    beta: float = _opt(0.04, "GRPO: weight of the KL penalty to the reference policy (the base with adapters off, "
                       "or the frozen --init-adapter); 0 turns it off and skips the reference forward.",
                       range=AT_LEAST_0)
    num_iterations: int = _opt(1, "GRPO: optimizer steps on each batch of sampled completions (their log-probs at "
                               "sampling time kept as pi_old).", range=AT_LEAST_1)
    reward: list[str] | None = _opt(None, "GRPO: reward functions, one or more: exact, number, regex:PATTERN, "
                                    "json-schema:FILE, module:function or path/to/file.py:function (called as "
                                    "f(prompts, completions, **columns) -> list of floats).")
    reward_weights: list[float] | None = _opt(None, "GRPO: weight of each --reward (and --reward-model) in the "
                                              "total reward, in their order (default: 1 each).")
    reward_model: str | None = _opt(None, "GRPO: a reward model folder (from --method reward) scoring each "
                                    "completion; adds to the --reward functions.")
    # continued fine-tuning without forgetting (engine.run.retention, engine.data.replay)
    retain_data: str | None = _opt(None, "General data (any format of --data) measured at step 0, at every "
                                   "evaluation and at the end: its loss (retain/loss), the change against the base "
                                   "model with every adapter off (retain/loss_delta) and the mean KL(base || "
                                   "policy) per token on it (retain/kl), in the eval lines of metrics.jsonl.")
    replay_data: str | None = _opt(None, "SFT: general samples (any format of --data) mixed into the training "
                                   "batches, --replay-ratio of all samples trained on (replay/loss in the train "
                                   "lines).")
    replay_ratio: float = _opt(0.1, "SFT with --replay-data: the fraction of the samples of each step that come "
                               "from the replay data (over the run exactly, to within one sample per step).",
                               range=Range(0, 1, low_open=True, high_open=True))
    kl_to_base: float = _opt(0.0, "SFT: add this beta times the mean KL(base || policy) per trained token to the "
                             "loss (the base: the same weights with every adapter off, no second copy); 0 turns "
                             "it off.", range=AT_LEAST_0)
    max_forgetting: float | None = _opt(None, "With --retain-data: the most the retention loss may rise over the "
                                        "base's, in nats per token; see --on-budget. A starting adapter already past it at step 0 "
                                        "stops the run (default: no budget).",
                                        range=AT_LEAST_0)
    on_budget: str = _opt("stop", "With --max-forgetting: stop (end the run at the first evaluation over the "
                          "budget; adapter/ is the last evaluated adapter inside it) or keep-best (train to the "
                          "end; adapter/ is the in-budget adapter with the lowest eval loss, or the last in-budget "
                          "one without an eval set, and adapter-last/ the final weights).", ON_BUDGET)
    # length and batching
    max_len: int | None = _opt(None, "Maximum tokens per sample (default: min(model context, 2048)).",
                               range=Range(2))
    length_policy: str = _opt("truncate", "What to do with samples longer than --max-len.", LENGTH_POLICIES)
    batching: str | None = _opt(None, "How samples make a batch: padding-free (one row of the batch's samples "
                                "concatenated, attention and loss never crossing a sample: no padding), padded "
                                "(one right-padded row per sample) or pack (full rows of --max-len tokens, as "
                                "--pack). The samples of each batch, hence steps and epochs, are the same for "
                                "padding-free and padded (default: padding-free, pack with --pack).", BATCHINGS)
    pack: bool = _opt(False, "Pack samples into full rows of --max-len tokens (attention never crosses samples); "
                      "the same as --batching pack.")
    max_tokens_per_batch: int | None = _opt(None, "With --batching padding-free: batches of as many consecutive "
                                            "samples (pairs for DPO, both sequences counted) as fit in this many "
                                            "tokens, instead of --batch-size samples; a longer sample is refused "
                                            "(never split).", range=AT_LEAST_1)
    train_on_prompt: bool = _opt(False, "Also compute the loss on prompt / user tokens.")
    batch_size: int = _opt(4, "Samples per micro-batch (pairs for DPO; packed rows with --pack).", range=AT_LEAST_1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.", range=AT_LEAST_1)
    epochs: float = _opt(1.0, "Passes over the training data (ignored when --max-steps is set).", range=POSITIVE)
    max_steps: int | None = _opt(None, "Optimizer steps to run (default: from --epochs).", range=AT_LEAST_1)
    # optimisation
    lr: float | None = _opt(None, "Peak learning rate (default: 2e-4 for --method sft, 5e-5 for dpo, 1e-4 for "
                            "reward, 1e-5 for grpo).",
                            range=POSITIVE)
    lr_schedule: str = _opt("cosine", "Learning-rate schedule after warmup.", SCHEDULES)
    warmup_steps: int | None = _opt(None, "Linear warmup steps (default: 3% of the run).", range=AT_LEAST_0)
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LoRA weights.", range=AT_LEAST_0)
    adam_beta1: float = _opt(0.9, "AdamW beta1.", range=FRACTION)
    adam_beta2: float = _opt(0.999, "AdamW beta2.", range=FRACTION)
    adam_eps: float = _opt(1e-8, "AdamW epsilon.", range=POSITIVE)
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value (0 disables).", range=AT_LEAST_0)
    max_bad_steps: int = _opt(5, "Stop after this many consecutive steps with a non-finite loss or gradient.",
                              range=AT_LEAST_1)
    # the parameter-efficient method
    peft: str = _opt("lora", "The method: lora; dora (weight-decomposed LoRA, a trained magnitude per output); ia3 "
                     "(learned scales on k, v and the MLP's down-projection input); prefix (learned key/value "
                     "prefixes per layer, --num-virtual-tokens); bottleneck (small adapters after attention and/or "
                     "the MLP, --adapter-dim). Each works with --quant nf4. Saved in HF PEFT's format, except "
                     "bottleneck (PEFT has none: our own JSON config beside the safetensors).", PEFTS)
    lora_init: str = _opt("default", "LoRA/DoRA initialisation: default (A Kaiming-uniform, B zero: PEFT's), gaussian "
                          "(A ~ N(0, 1/r)), pissa or olora (A and B from the base weight, which they change: the "
                          "adapter is saved as a plain LoRA against the original base), loftq (A and B that cancel "
                          "the NF4 rounding, for --quant nf4).", LORA_INITS)
    loraplus_ratio: float | None = _opt(None, "LoRA+: B's learning rate is this many times A's (e.g. 16); default: "
                                        "one rate for all.", range=POSITIVE)
    num_virtual_tokens: int = _opt(20, "--peft prefix: virtual key/value tokens per layer.", range=AT_LEAST_1)
    prefix_projection: bool = _opt(False, "--peft prefix: train the prefixes through a two-layer MLP "
                                   "(reparameterisation, folded into plain prefixes when saved).")
    adapter_dim: int = _opt(64, "--peft bottleneck: the adapters' inner (bottleneck) size.", range=AT_LEAST_1)
    adapter_placement: str = _opt("houlsby", "--peft bottleneck: houlsby (after attention and after the MLP) or "
                                  "pfeiffer (after the MLP only).", ADAPTER_PLACEMENTS)
    # LoRA
    lora_r: int = _opt(16, "LoRA rank (at most the smallest dimension of a targeted linear).", range=AT_LEAST_1)
    lora_alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora).",
                             range=POSITIVE)
    lora_dropout: float | None = _opt(None, "Dropout on the LoRA/DoRA input, or a bottleneck adapter's (default: "
                                      "0.05; 0 for --method grpo, "
                                      "whose importance ratio compares the policy with itself at sampling "
                                      "time).", range=FRACTION)
    rslora: bool = _opt(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    target_modules: str = _opt("all-linear", "Comma-separated module names (q_proj,...,down_proj) or 'all-linear'.")
    init_adapter: str | None = _opt(None, "Start from this PEFT-format adapter folder (ours or made elsewhere); "
                                    "its own method, r, alpha and targets are used.")
    quant: str = _opt("none", "Quantize the frozen base: 'nf4' for QLoRA (4-bit), 'int8' (per-row absmax, "
                      "as load_in_8bit stores it), 'fp8' (per-row scaled e4m3; its products in FP8 on a GPU of "
                      "compute capability >= 8.9, emulated on a CPU).", QUANTS)
    # machine
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    dtype: str = _opt("auto", "Compute dtype of the frozen base: auto (bf16 on GPU, fp32 on CPU).", DTYPES)
    grad_checkpointing: bool | None = _opt(None, "Recompute each block in backward (default: on for a GPU, "
                                           "off for a CPU).")
    offload_activations: bool = _opt(False, "Keep the block inputs saved for gradient checkpointing in (pinned) CPU "
                                     "memory until the backward, copied on a side stream (long context); turns "
                                     "gradient checkpointing on.")
    mlp_chunk_tokens: int | None = _opt(None, "Run each block's MLP in training over chunks of this many tokens, "
                                        "each recomputed in its backward: the MLP's (tokens x intermediate) "
                                        "tensors then exist for one chunk at a time (long context), for one more "
                                        "MLP forward per step (and, with --quant nf4, a dequantization per chunk); "
                                        "LoRA dropout draws its masks per chunk. Default: in one piece.",
                                        range=AT_LEAST_1)
    distributed: str = _opt("auto", "Under torchrun: ddp (every rank holds the model; the LoRA gradients are "
                            "all-reduced) or fsdp (FSDP2: base weights, NF4 bytes included, LoRA weights and "
                            "optimizer states sharded across the ranks, all-gathered per block). auto: one process "
                            "without torchrun or with one rank, else ddp. --batch-size is per rank: a step takes "
                            "grad_accum x ranks micro-batches, as one process with --grad-accum grad_accum x ranks.",
                            DISTRIBUTED)
    dist_timeout: float = _opt(600.0, "Seconds a collective may wait for the other ranks before this rank stops with "
                               "an error (a rank that died or hangs never leaves the others waiting for ever).",
                               range=POSITIVE)
    seed: int = _opt(42, "Seed for LoRA init, data order and dropout.", range=Range(0, MAX_SEED))
    # schedule of evaluation and checkpoints
    eval_every: int = _opt(0, "Evaluate every N steps (0: at the start and the end only).", range=AT_LEAST_0)
    save_every: int = _opt(0, "Write a resumable checkpoint every N steps (0: only on SIGTERM).",
                           range=AT_LEAST_0)
    keep_checkpoints: int = _opt(2, "Keep the newest N checkpoints.", range=AT_LEAST_1)
    resume: bool = _opt(False, "Continue from the newest complete checkpoint in --output (refused when the "
                        "checkpoint was made for other data, model or settings).")
    log_every: int = _opt(1, "Write a metrics line every N steps.", range=AT_LEAST_1)

    def __post_init__(self) -> None:
        for name, value in METHOD_DEFAULTS.get(self.method, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.batching is None:  # --pack keeps its meaning; otherwise padding-free
            self.batching = "pack" if self.pack is True else "padding-free"
        elif self.batching == "pack" and self.pack is False:
            self.pack = True  # one setting, two spellings: config.json shows both agreeing

    def validate(self) -> None:
        """Raise InputError for the first value no run can use, naming its flag."""
        for f in fields(self):
            problem = check_value(f.name, getattr(self, f.name))
            if problem is not None:
                raise InputError(f"--{flag_name(f.name)}: {problem}")
        if not self.model:
            raise InputError("--model is required (a local folder or a preset name)")
        if not self.data:
            raise InputError("--data is required (a JSONL or JSON file)")
        if not self.output:
            raise InputError("--output must name a folder")
        if self.eval_data is not None and self.eval_split:
            raise InputError("--eval-data and --eval-split both choose an eval set: give one of them")
        if self.pack and self.batching != "pack":
            raise InputError(f"--pack and --batching {self.batching} disagree: give one of them")
        if self.max_tokens_per_batch is not None and self.batching != "padding-free":
            raise InputError(f"--max-tokens-per-batch applies to --batching padding-free, not {self.batching} "
                             "(packed rows hold --max-len tokens each; padded batches --batch-size samples)")
        if self.peft not in ("lora", "dora") and (self.lora_init != "default" or self.loraplus_ratio is not None):
            raise InputError(f"--{'lora-init' if self.lora_init != 'default' else 'loraplus-ratio'} applies to --peft "
                             f"lora or dora, not {self.peft}")
        if self.peft == "prefix" and self.offload_activations:
            raise InputError("--offload-activations does not take --peft prefix yet (the offloaded checkpoint of a "
                             "block carries no prefix keys/values): use gradient checkpointing alone")
        if self.peft == "dora" and self.lora_init not in ("default", "gaussian"):
            raise InputError(f"--lora-init {self.lora_init} changes the base weight, which DoRA's magnitude is "
                             "measured on: with --peft dora use default or gaussian")
        if self.method == "reward" and self.peft not in ("lora", "dora", "bottleneck"):
            raise InputError(f"--method reward saves its score head beside a LoRA, DoRA or bottleneck adapter, not "
                             f"--peft {self.peft}")
        if self.lora_init == "loftq" and self.quant != "nf4":
            raise InputError("--lora-init loftq initialises LoRA to cancel the NF4 rounding of the base: it needs "
                             "--quant nf4")
        if self.init_adapter and self.lora_init != "default":
            raise InputError(f"--lora-init {self.lora_init} initialises a fresh adapter; --init-adapter starts from "
                             "trained weights")
        if self.offload_activations and self.grad_checkpointing is False:
            raise InputError("--offload-activations keeps the inputs of gradient checkpointing in CPU memory: it "
                             "needs checkpointing, which --no-grad-checkpointing turns off")
        if self.method != "sft" and (self.replay_data or self.kl_to_base):
            raise InputError(f"--{'replay-data' if self.replay_data else 'kl-to-base'} applies to --method sft, "
                             f"not {self.method} (--retain-data and --max-forgetting work for every method)")
        if self.replay_data and self.batching == "pack":
            raise InputError("--replay-data mixes whole samples into batches of samples; it does not apply to "
                             "packed rows (--pack / --batching pack): use --batching padding-free")
        if self.max_forgetting is not None and not self.retain_data:
            raise InputError("--max-forgetting is measured on --retain-data: give the general data to measure it on")
        if self.on_budget != "stop" and self.max_forgetting is None:
            raise InputError(f"--on-budget {self.on_budget} applies with --max-forgetting")
        if self.dpo_label_smoothing and self.dpo_loss not in ("sigmoid", "robust"):
            raise InputError(f"--dpo-label-smoothing applies to the sigmoid and robust losses, not {self.dpo_loss!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag_name(name: str) -> str:
    return name.replace("_", "-")


_HINTS = get_type_hints(TrainConfig)
_FIELDS = {f.name: f for f in fields(TrainConfig)}


LIST_KINDS = {list[str]: str, list[float]: float}  # list-valued fields (a flag given several values) -> item type


def field_kind(name: str) -> tuple[type, bool]:
    """(type, optional) of a field: ``int | None`` -> (int, True); ``list[str] | None`` -> (list[str], True)."""
    hint = _HINTS[name]
    args = getattr(hint, "__args__", None)
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def check_value(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``name`` (its type, finiteness, choices, range), or None."""
    kind, optional = field_kind(name)
    if value is None:
        return None if optional or _FIELDS[name].default is None else "a value is required"
    if kind in LIST_KINDS:
        if not isinstance(value, (list, tuple)) or not value:
            return f"expected a list of one or more values, got {_shown(value)}"
        for item in value:
            problem = _check_scalar(name, LIST_KINDS[kind], item)
            if problem is not None:
                return problem
        return None
    return _check_scalar(name, kind, value)


def _check_scalar(name: str, kind: type, value: Any) -> str | None:
    meta = _FIELDS[name].metadata
    if kind is bool and not isinstance(value, bool):
        return f"expected true or false, got {_shown(value)}"
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"expected a whole number, got {_shown(value)}"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_shown(value)}"
        if not math.isfinite(value):
            return f"expected a finite number, got {value}"
    if kind is str and not isinstance(value, str):
        return f"expected a string, got {_shown(value)}"
    if meta["choices"] and value not in meta["choices"]:
        return f"{value!r}: expected one of {', '.join(meta['choices'])}"
    if meta["range"] is not None and not meta["range"].holds(value):
        return f"expected a value {meta['range'].describe()}, got {value:g}"
    return None


def _shown(value: Any) -> str:
    kind = {str: "the string", float: "the number", int: "the number", bool: "the boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if isinstance(value, (str, int, float, bool)) else kind
