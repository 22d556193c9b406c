"""Converters and helpers: GGUF -> HF safetensors, the real-weights fixture, random checkpoints."""
