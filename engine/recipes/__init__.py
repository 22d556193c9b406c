"""Training methods as recipes: one module per method whose step reads top to bottom, built from
the shared components of `engine.run`, `engine.data`, `engine.losses` and `engine.adapters`.

The module of ``--method NAME`` is ``engine.recipes.NAME``; it has ``train(cfg, progress)``
(returning the finished `engine.run.session.Run`) and ``summarize(eval_metrics)``. A new method
is a new file here and its name in `engine.config.METHODS`.
"""
