"""Serving: an OpenAI-compatible HTTP server over a run (transformers engine, or vLLM on GPUs)
and a chat client for any OpenAI-compatible endpoint."""
