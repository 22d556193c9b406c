"""Training methods as recipes: one module per method whose step reads top to bottom, built from
the shared components of `engine.run`, `engine.data`, `engine.losses` and `engine.adapters`.

`RECIPES` maps a ``--method`` name to its module; each module has ``train(cfg, progress)``.
A new method is a new file here and one line below.
"""

RECIPES = {
    "sft": "engine.recipes.sft",
    "dpo": "engine.recipes.dpo",
}
