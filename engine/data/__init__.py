"""Training data: reading files, formats, tokenization with masks, SFT samples, preference pairs,
and deterministic resumable batches (padded or packed)."""
