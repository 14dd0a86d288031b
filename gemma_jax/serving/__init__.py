"""The HTTP server behind `python -m gemma_jax.serve`: engines, routes and metrics."""
