"""Imports every method's module, each of which registers itself in `engine.adapters.methods.METHODS`
(in this order: the order ``--help`` and errors list them)."""

import engine.adapters.lora_method  # noqa: F401  lora
import engine.adapters.dora_method  # noqa: F401  dora
import engine.adapters.ia3_method  # noqa: F401  ia3
import engine.adapters.prefix_method  # noqa: F401  prefix
import engine.adapters.bottleneck_method  # noqa: F401  bottleneck
