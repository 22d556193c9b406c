"""The trade-off chart of `engine.eval`: domain gain against forgetting, one point per adapter.

For an adapter row a and the base row b (losses in nats per counted token)::

    x(a) = forgetting  = L_general(a) − L_general(b)     (> 0: worse on general text than the base)
    y(a) = domain gain = L_domain(b) − L_domain(a)       (> 0: better on the domain than the base)

The base sits at the origin; up and to the left is better. A chain of runs shows as a path: an
adapter trained from another (``--init-adapter``) records the resolved path of its starting
adapter as ``parent_adapter`` in its lineage (`engine.run.folder.lineage`, stored in the adapter's
safetensors header, `engine.adapters.peft_format.read_adapter_metadata`), and the record of that
parent's own lineage under ``parent``. An arrow goes to each adapter from its nearest ancestor
among the adapters shown (paths compared resolved), else from the base (`tradeoff_edges`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.adapters.peft_format import read_adapter_metadata
from engine.comparison import Row


@dataclass(frozen=True)
class Node:
    """One adapter of the chart: its name (the row's), its folder, and the folders of its
    ancestors, nearest first (``parent_adapter`` of its lineage, then of the parent's, ...)."""

    name: str
    path: Path
    ancestors: tuple[Path, ...]


def lineage_ancestors(record: dict | None) -> tuple[Path, ...]:
    """The ``parent_adapter`` paths of a lineage record and of its nested ``parent`` records,
    nearest first, resolved (empty for a fresh adapter or one without lineage)."""
    ancestors = []
    while isinstance(record, dict):
        if record.get("parent_adapter"):
            ancestors.append(Path(record["parent_adapter"]).resolve())
        record = record.get("parent")
    return tuple(ancestors)


def read_node(name: str, path: str | Path) -> Node:
    """The `Node` of the adapter folder ``path`` (its lineage read from the safetensors header)."""
    return Node(name, Path(path).resolve(), lineage_ancestors(read_adapter_metadata(path)))


def tradeoff_edges(nodes: list[Node], base: str = "base") -> list[tuple[str, str]]:
    """(from name, to name) for each node in order: from the nearest of its ancestors that is
    another of ``nodes`` (by resolved path), else from ``base``."""
    by_path = {node.path.resolve(): node.name for node in nodes}
    edges = []
    for node in nodes:
        own = node.path.resolve()
        ancestors = [p.resolve() for p in node.ancestors]
        source = next((by_path[p] for p in ancestors if p != own and p in by_path), base)
        edges.append((source, node.name))
    return edges


def tradeoff_points(rows: list[Row], domain: str, general: str) -> dict[str, tuple[float, float]]:
    """{row name: (forgetting x, domain gain y)}, rows[0] the base (at (0, 0))."""
    base = rows[0]
    return {row.name: (row.delta(base, general), -row.delta(base, domain)) for row in rows}


def short_label(name: str) -> str:
    """A row name as a point label: a path shortened to its last two parts ("run1/adapter")."""
    parts = Path(name).parts
    return name if len(parts) <= 2 else str(Path(*parts[-2:]))


def plot_tradeoff(points: dict[str, tuple[float, float]], edges: list[tuple[str, str]], png: Path) -> None:
    """Scatter of ``points`` (the first one the base, at the origin) with an arrow per edge
    (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.axvline(0.0, color="0.6", lw=0.8)
    for source, target in edges:
        ax.annotate("", xy=points[target], xytext=points[source],
                    arrowprops=dict(arrowstyle="->", color="0.35", lw=1.0, shrinkA=4, shrinkB=4))
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], s=36, color="black" if i == 0 else f"C{(i - 1) % 10}", zorder=3)
        ax.annotate(short_label(name), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("forgetting: Δ general loss vs base (nats / token)")
    ax.set_ylabel("domain gain: base − adapter loss (nats / token)")
    ax.set_title("domain gain vs forgetting (better: up and left)", fontsize=10)
    ax.margins(x=0.3, y=0.2)  # room for the labels (right of each point) around the outer points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
