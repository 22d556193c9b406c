"""``--reward`` specs to a RewardSet: built-ins, module and file functions, names, weights, and
every load-time error naming the spec and the flag."""

from __future__ import annotations

import sys
import textwrap

import pytest

from engine.errors import InputError
from engine.rewards import load_reward_functions
from engine.rewards.loading import unique_names

REWARD_FILE = """
from dataclasses import dataclass
from helper import BONUS          # a sibling module: the file's folder is on sys.path while it imports

@dataclass
class Config:                     # dataclasses need the module in sys.modules
    bonus: float = BONUS

def length_bonus(prompts, completions, **columns):
    return [Config().bonus * len(c) for c in completions]

short = lambda prompts, completions, **columns: [float(len(c) < 3) for c in completions]
NOT_CALLABLE = 3
"""


@pytest.fixture
def reward_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "helper.py").write_text("BONUS = 0.5\n")
    path = folder / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


@pytest.fixture
def reward_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "myrewards"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "math_rewards.py").write_text(textwrap.dedent("""
        class Grader:
            @staticmethod
            def upper(prompts, completions, **columns):
                return [float(c.isupper()) for c in completions]

        def uses_topic(prompts, completions, topic, **columns):
            return [float(t in c) for c, t in zip(completions, topic)]
        uses_topic.required_columns = "topic"      # one name as a string
    """))
    (pkg / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "myrewards"


def test_builtins_and_default_weights(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    rs = load_reward_functions(["exact", "number", r"regex:^\d+$", f"json-schema:{schema}"], None)
    assert rs.names == ["exact", "number", "regex", "json_schema"]
    assert rs.weights == [1.0, 1.0, 1.0, 1.0]
    assert rs.required_columns() == {"answer"}
    assert rs.rewards[2].spec == r"--reward regex:^\d+$"


def test_file_function(reward_file):
    before = list(sys.path)
    rs = load_reward_functions([f"{reward_file}:length_bonus", f"{reward_file}:short"], [2.0, -1.0])
    assert sys.path == before                                   # the folder was on it only while importing
    assert rs.names == ["length_bonus", "short"]                # a lambda is named after its attribute
    assert rs.rewards[0].fn([""], ["abcd"]) == [2.0]
    assert rs.rewards[0].fn.__module__ == rs.rewards[1].fn.__module__   # the file is imported once
    assert rs.weights == [2.0, -1.0] and rs.required_columns() == set()


def test_module_function(reward_package):
    rs = load_reward_functions([f"{reward_package}.math_rewards:Grader.upper",
                                f"{reward_package}.math_rewards:uses_topic"], None)
    assert rs.names == ["upper", "uses_topic"]
    assert rs.required_columns() == {"topic"}
    assert rs.rewards[0].fn([""] * 2, ["AB", "ab"]) == [1.0, 0.0]


def test_reward_model_is_one_more_function():
    def reward_model(prompts, completions, **columns):
        return [0.5] * len(completions)

    seen = []
    rs = load_reward_functions(["exact"], [1.0, 0.25], reward_model="runs/rm",
                               reward_model_loader=lambda path: seen.append(path) or reward_model)
    assert seen == ["runs/rm"] and rs.names == ["exact", "reward_model"] and rs.weights == [1.0, 0.25]
    assert rs.rewards[1].spec == "--reward-model runs/rm"
    only = load_reward_functions(None, None, reward_model="runs/rm", reward_model_loader=lambda path: reward_model)
    assert only.names == ["reward_model"]


def test_duplicate_names_get_suffixes(reward_file):
    rs = load_reward_functions(["regex:a", "exact", "regex:b", "regex:c"], None)
    assert rs.names == ["regex_1", "exact", "regex_2", "regex_3"]
    assert unique_names(["regex", "regex_1", "regex"]) == ["regex_2", "regex_1", "regex_3"]
    assert unique_names(["f", "g", "f", "g", "h"]) == ["f_1", "g_1", "f_2", "g_2", "h"]


@pytest.mark.parametrize("spec, message", [
    ("exactly", r"--reward exactly: unknown reward; expected exact, number, regex:PATTERN"),
    ("regex:", r"--reward regex:: empty pattern"),
    ("regex:[a-", r"--reward regex:\[a-: not a valid regular expression"),
    ("json-schema:", r"--reward json-schema:: no file"),
    ("json-schema:nowhere.json", r"--reward json-schema:nowhere.json: no such file"),
    ("nowhere/r.py:f", r"--reward nowhere/r.py:f: no such file nowhere/r.py"),
    ("no_such_module_xyz:f", r"--reward no_such_module_xyz:f: importing no_such_module_xyz failed: "
                             r"ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("{pkg}.broken:f", r"--reward myrewards.broken:f: importing myrewards.broken failed: RuntimeError: no GPU here"),
    ("{pkg}.math_rewards:missing", r"--reward myrewards.math_rewards:missing: myrewards.math_rewards has no "
                                   r"attribute 'missing'"),
    ("{file}:NOT_CALLABLE", r"--reward .*my_rewards.py:NOT_CALLABLE: NOT_CALLABLE is a int, not a function"),
    ("{file}:nope", r"my_rewards.py has no attribute 'nope'"),
    (":f", r"--reward :f: unknown reward"),
])
def test_load_errors_name_the_spec(spec, message, reward_file, reward_package):
    with pytest.raises(InputError, match=message):
        load_reward_functions([spec.format(pkg=reward_package, file=reward_file)], None)


def test_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    modules = set(sys.modules)
    with pytest.raises(InputError, match=r"--reward .*bad.py:f: importing .*bad.py failed: SyntaxError: "):
        load_reward_functions([f"{bad}:f"], None)
    assert set(sys.modules) == modules and str(tmp_path) not in sys.path


def test_nothing_given_and_weight_errors():
    with pytest.raises(InputError, match=r"^--method grpo needs at least one --reward or --reward-model$"):
        load_reward_functions([], None)
    with pytest.raises(InputError, match=r"--reward-weights: 1 weight\(s\) for 2 reward function\(s\) "
                                         r"\(exact, number\)"):
        load_reward_functions(["exact", "number"], [1.0])
    with pytest.raises(InputError, match=r"--reward-weights: 3 weight\(s\) for 2 .*\(exact, reward_model\)"):
        load_reward_functions(["exact"], [1.0, 1.0, 1.0], reward_model="rm",
                              reward_model_loader=lambda path: _named_reward_model)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError, match=r"--reward-weights: weight 2 \(number\) is .*expected a finite"):
            load_reward_functions(["exact", "number"], [1.0, bad])


def _named_reward_model(prompts, completions, **columns):
    return [0.0] * len(completions)


_named_reward_model.__name__ = "reward_model"
