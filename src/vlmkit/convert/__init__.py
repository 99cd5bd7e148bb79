"""Checkpoint conversion between vlmkit and other ecosystems (Hugging Face: ``vlmkit.convert.hf``)."""
