"""Training loops and everything a run needs: LoRA injection, data, optimizer, checkpoints, adapters, CLI."""
