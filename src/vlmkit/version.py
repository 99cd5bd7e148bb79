"""The version of vlmkit (pyproject.toml says the same), written into checkpoints and evaluation results."""

__version__ = "0.1.0"
