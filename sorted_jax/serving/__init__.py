"""Serving: the request scheduler and the OpenAI-compatible HTTP app."""
