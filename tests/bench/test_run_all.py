"""bench.run_all's commands: every benchmark accepts the arguments run_all gives it, so that a
lent GPU's few minutes are not lost to a usage error (the parse alone runs here, nothing is timed)."""

import argparse
import importlib

import pytest

from bench import run_all


class Parsed(Exception):
    """Raised in place of running the benchmark once its arguments have parsed."""


@pytest.fixture
def parse_only(monkeypatch):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)  # exits 2 on an argument the benchmark does not take
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def refused(module: str, args: list[str]) -> str | None:
    try:
        importlib.import_module(module).main(args)
    except Parsed:
        return None
    except SystemExit as exit_:
        return f"python -m {module} {' '.join(args)}: exit {exit_.code}"
    return f"python -m {module} {' '.join(args)}: ran without parsing its arguments"


def test_every_benchmark_takes_the_arguments_run_all_gives_it(parse_only, tmp_path, capsys):
    commands = [run_all.bench_args(name, tmp_path, quick)
                for name in run_all.BENCHES + run_all.EXTRA_BENCHES for quick in (False, True)]
    commands += [("bench.bench_train", run_all.train_args(tmp_path, 240, gpu)) for gpu in (False, True)]
    failures = [f for f in (refused(module, args) for module, args in commands) if f]
    assert not failures, "\n".join(failures) + "\n" + capsys.readouterr().err


def test_quick_passes_no_compile_only_to_benchmarks_with_a_compile_provider(tmp_path):
    assert "--no-compile" in run_all.bench_args("rms_norm", tmp_path, True)[1]
    assert "--no-compile" not in run_all.bench_args("dora", tmp_path, True)[1]
    assert "--no-compile" not in run_all.bench_args("rms_norm", tmp_path, False)[1]
    assert run_all.bench_args("lora_group_fp8", tmp_path, False) == ("bench.bench_lora_group",
                                                                     ["--fp8", "--out", str(tmp_path)])
