"""The judge of generated ShapesWorld scenes (GenEval on ShapesWorld): a fixed scene parser
(:mod:`~vlmkit.eval.judge.parser`, trained by :mod:`~vlmkit.eval.judge.train`), text-to-image prompts with
their specs, an oracle renderer and the checker (:mod:`~vlmkit.eval.judge.specs`), and the ``shapes_t2i`` task
(:mod:`~vlmkit.eval.judge.task`). Import the modules themselves; this package imports nothing."""
