"""The first lines of the example preference files, for the recipes' tests on the tiny model."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PREFS = ROOT / "examples" / "license_prefs.jsonl"
PREFS_EVAL = ROOT / "examples" / "license_prefs_eval.jsonl"


def write_pref_subset(out: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """``out/train.jsonl`` (the first n_train pairs) and ``out/eval.jsonl`` (the first n_eval held out)."""
    (out / "train.jsonl").write_text("\n".join(PREFS.read_text().splitlines()[:n_train]) + "\n")
    (out / "eval.jsonl").write_text("\n".join(PREFS_EVAL.read_text().splitlines()[:n_eval]) + "\n")
    return out / "train.jsonl", out / "eval.jsonl"
