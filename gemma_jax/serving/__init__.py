"""The HTTP server behind `python -m gemma_jax.serve`: a batching engine and its FastAPI routes."""
