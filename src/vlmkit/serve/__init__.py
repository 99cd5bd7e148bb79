"""Serving: the continuous-batching engine (engine.py), the OpenAI-compatible HTTP API (api.py: the app and
its routes; parsing.py: request parsing and validation, the error shape), its metrics (metrics.py) and its
chat page (static/index.html)."""
