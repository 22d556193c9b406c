"""``--reward`` specs (and ``--reward-model``) to a `RewardSet`, every error found at load time.

A spec is one of

    exact | number                    built-in graders (`engine.rewards.graders`)
    regex:PATTERN                     built-in, ``re.search`` with no flags
    json-schema:FILE                  built-in, the schema checked now
    module.path:function              ``importlib.import_module`` (the module on sys.path)
    path/to/file.py:function          the file imported by path; its folder is on sys.path only
                                      while it is imported (for its own sibling imports)

(the prefixes ``regex:`` and ``json-schema:`` win over a module of that name). ``function`` may be
dotted (``module:Class.method``). A function's metric name is TRL's: the built-in's name
(``exact``, ``number``, ``regex``, ``json_schema``), else the callable's ``__name__`` (the attribute
name for a lambda or an object without one), the reward model's ``__name__`` (``reward_model``).
A name that occurs k > 1 times gets the suffixes ``_1`` … ``_k`` in spec order (``regex_1``,
``regex_2``), skipping any suffixed name another function already has.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from engine.errors import InputError
from engine.rewards import graders
from engine.rewards.scoring import Reward, RewardSet, one_line

FLAG = "--reward"
BUILTINS: dict[str, Callable] = {"exact": graders.exact, "number": graders.number}
SPEC_FORMS = "exact, number, regex:PATTERN, json-schema:FILE, module:function or path/to/file.py:function"


def load_reward_functions(specs: list[str] | None, weights: list[float] | None, reward_model: str | None = None,
                          reward_model_loader: Callable[[str], Callable] | None = None) -> RewardSet:
    """The `RewardSet` of the ``--reward`` specs in order, then the ``--reward-model`` folder
    (``reward_model_loader(path)`` returns its scoring callable), weighted by ``--reward-weights``
    (default 1 each). InputError, naming the flag and the spec, for anything that cannot load."""
    specs = list(specs or [])
    if not specs and reward_model is None:
        raise InputError("--method grpo needs at least one --reward or --reward-model")
    modules: dict[Path, ModuleType] = {}  # a file named by several specs is imported once
    loaded = [(f"{FLAG} {spec}", *load_reward_function(spec, modules)) for spec in specs]
    if reward_model is not None:
        if reward_model_loader is None:
            raise ValueError("a --reward-model needs a reward_model_loader")
        fn = reward_model_loader(reward_model)
        if not callable(fn):
            raise TypeError(f"reward_model_loader returned {type(fn).__name__}, not a callable")
        loaded.append((f"--reward-model {reward_model}", fn, getattr(fn, "__name__", "reward_model")))
    weights = check_weights(weights, [name for _, _, name in loaded])
    names = unique_names([name for _, _, name in loaded])
    return RewardSet([Reward(name, fn, w, spec, required_columns(fn))
                      for (spec, fn, _), name, w in zip(loaded, names, weights)])


def required_columns(fn: Callable) -> frozenset[str]:
    """The function's ``required_columns`` attribute (a name or a collection of names), else none."""
    declared = getattr(fn, "required_columns", ())
    return frozenset([declared] if isinstance(declared, str) else declared)


def load_reward_function(spec: str, modules: dict[Path, ModuleType] | None = None) -> tuple[Callable, str]:
    """(the callable, its metric name before de-duplication) of one ``--reward`` spec."""
    if spec in BUILTINS:
        return BUILTINS[spec], spec
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        if not pattern:
            raise InputError(f"{FLAG} {spec}: empty pattern; expected regex:PATTERN")
        return graders.regex_grader(pattern, FLAG), "regex"
    if spec.startswith("json-schema:"):
        path = spec[len("json-schema:"):]
        if not path:
            raise InputError(f"{FLAG} {spec}: no file; expected json-schema:FILE")
        return graders.json_schema_grader(path, FLAG), "json_schema"
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise InputError(f"{FLAG} {spec}: unknown reward; expected {SPEC_FORMS}")
    module = _import_file(spec, Path(where), modules) if where.endswith(".py") else _import_module(spec, where)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise InputError(f"{FLAG} {spec}: {where} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise InputError(f"{FLAG} {spec}: {attr} is a {type(fn).__name__}, not a function")
    name = getattr(fn, "__name__", None)
    return fn, name if isinstance(name, str) and name != "<lambda>" else attr.split(".")[-1]


def _import_module(spec: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise InputError(f"{FLAG} {spec}: importing {name} failed: {type(err).__name__}: {one_line(err)}") from None


def _import_file(spec: str, path: Path, modules: dict[Path, ModuleType] | None) -> ModuleType:
    """Import ``path`` as a module of its own (registered in sys.modules under a name made from its
    stem and absolute path, so that dataclasses and pickling inside it work); its folder is put
    first on sys.path for the import only."""
    if not path.is_file():
        raise InputError(f"{FLAG} {spec}: no such file {path}")
    resolved = path.resolve()
    if modules is not None and resolved in modules:
        return modules[resolved]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"engine_reward_{stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{FLAG} {spec}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise InputError(f"{FLAG} {spec}: importing {path} failed: {type(err).__name__}: {one_line(err)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)  # the first occurrence: the one inserted above
    if modules is not None:
        modules[resolved] = module
    return module


def check_weights(weights: list[float] | None, names: list[str]) -> list[float]:
    """The weights (1.0 each by default); InputError for a count that is not one per function or a
    non-finite weight."""
    if weights is None:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise InputError(f"--reward-weights: {len(weights)} weight(s) for {len(names)} reward function(s) "
                         f"({', '.join(names)}); give one per --reward, then one for --reward-model")
    for i, w in enumerate(weights):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise InputError(f"--reward-weights: weight {i + 1} ({names[i]}) is {w!r}, expected a finite number")
    return [float(w) for w in weights]


def unique_names(names: list[str]) -> list[str]:
    """Names made unique: each name that occurs k > 1 times becomes name_1 … name_k (in order),
    skipping a suffixed name that is already taken."""
    counts = Counter(names)
    taken = {n for n in names if counts[n] == 1}
    index: Counter = Counter()
    out = []
    for n in names:
        if counts[n] == 1:
            out.append(n)
            continue
        while True:
            index[n] += 1
            candidate = f"{n}_{index[n]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        out.append(candidate)
    return out
