"""vlmkit: build, train, evaluate and serve vision-language models from composable parts."""

from vlmkit.version import __version__


def load(path, device="cpu"):
    """Load a checkpoint folder and return a :class:`vlmkit.pipeline.Pipeline`."""
    from vlmkit.pipeline import Pipeline

    return Pipeline.from_pretrained(path, device=device)


__all__ = ["__version__", "load"]
