"""Serving: the continuous-batching engine (engine.py), the OpenAI-compatible HTTP API (api.py) and its chat page."""
