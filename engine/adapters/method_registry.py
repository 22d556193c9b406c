"""Imports every method's module, each of which registers itself in `engine.adapters.methods.METHODS`
and ``ORDER``: the order errors list them in, whatever order they were first imported in."""

import engine.adapters.lora_method  # noqa: F401  lora
import engine.adapters.dora_method  # noqa: F401  dora
import engine.adapters.ia3_method  # noqa: F401  ia3
import engine.adapters.prefix_method  # noqa: F401  prefix
import engine.adapters.bottleneck_method  # noqa: F401  bottleneck

ORDER = ("lora", "dora", "ia3", "prefix", "bottleneck")
