"""engine.tradeoff: the arrows of the chart follow the lineage recorded in the adapters (a chain
A → B is a path base → A → B, an unrelated adapter hangs from the base, a missing middle link is
skipped), the points are (forgetting, domain gain), and the chart is drawn."""

from __future__ import annotations

from pathlib import Path

from engine.adapters import LoRAConfig, inject_lora, save_adapter
from engine.comparison import Row
from engine.losses.causal_lm import LossResult
from engine.run.folder import lineage
from engine.tradeoff import (
    Node,
    lineage_ancestors,
    plot_tradeoff,
    read_node,
    short_label,
    tradeoff_edges,
    tradeoff_points,
)
from tests.engine.test_eval import tiny_config
from tools.random_checkpoint import random_model


def save_run_adapter(out: Path, parent: Path | None, parent_lineage: dict | None) -> tuple[Path, dict]:
    """A tiny adapter folder whose metadata is the lineage a run started from ``parent`` writes."""
    cfg = LoRAConfig(r=2, alpha=4, target_modules=("q_proj",))
    model = random_model(tiny_config(), seed=1)
    inject_lora(model, cfg)
    record = lineage(method="sft", base_model="tiny", data=[], steps=1,
                     parent_adapter=str(parent) if parent else None, parent_lineage=parent_lineage)
    return save_adapter(model, cfg, out, "tiny", metadata=record), record


def test_edges_follow_the_recorded_lineage(tmp_path, monkeypatch):
    """A (fresh) → B (--init-adapter A) → D (--init-adapter B); C unrelated. Given A, B, C: base → A,
    A → B, base → C. Given A, C, D (B left out): D hangs from A, its nearest ancestor shown."""
    a, rec_a = save_run_adapter(tmp_path / "A", None, None)
    monkeypatch.chdir(tmp_path)  # B records A by a relative path, resolved by lineage()
    b, rec_b = save_run_adapter(tmp_path / "B", Path("A"), rec_a)
    c, _ = save_run_adapter(tmp_path / "C", None, None)
    d, _ = save_run_adapter(tmp_path / "D", b, rec_b)
    assert read_node("A", a) == Node("A", a.resolve(), ())
    assert read_node("D", d).ancestors == (b.resolve(), a.resolve())
    nodes = [read_node(name, path) for name, path in (("A", a), ("B", b), ("C", c))]
    assert tradeoff_edges(nodes) == [("base", "A"), ("A", "B"), ("base", "C")]
    # names are the rows' (the CLI uses the path as given); the order follows the nodes
    nodes = [read_node(str(path), path) for path in (d, c, a)]
    assert tradeoff_edges(nodes, base="BASE") == [(str(a), str(d)), ("BASE", str(c)), ("BASE", str(a))]


def test_edges_pure():
    """Paths compared resolved; an adapter that records itself as its parent hangs from the base;
    no lineage at all (an adapter from elsewhere) likewise."""
    x, y = Path("/runs/x/adapter"), Path("/runs/y/adapter")
    nodes = [Node("x", x, (x,)), Node("y", y, (Path("/runs/x/../x/adapter"),)), Node("z", Path("/z"), ())]
    assert tradeoff_edges(nodes) == [("base", "x"), ("x", "y"), ("base", "z")]
    assert lineage_ancestors(None) == () and lineage_ancestors({"parent_adapter": None, "parent": None}) == ()


def result(loss: float) -> LossResult:
    return LossResult(loss, 0.0, 10)


def test_points_and_chart(tmp_path):
    rows = [Row("base", {"domain": result(2.0), "general": result(3.0)}),
            Row("/runs/a/adapter", {"domain": result(1.25), "general": result(3.5)}),
            Row("b", {"domain": result(2.5), "general": result(2.75)})]
    points = tradeoff_points(rows, "domain", "general")
    assert points == {"base": (0.0, 0.0), "/runs/a/adapter": (0.5, 0.75), "b": (-0.25, -0.5)}
    assert [short_label(name) for name in points] == ["base", "a/adapter", "b"]
    png = tmp_path / "eval_tradeoff.png"
    plot_tradeoff(points, [("base", "/runs/a/adapter"), ("/runs/a/adapter", "b")], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
