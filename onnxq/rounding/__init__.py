"""Rounding many layers: the worker pool, shrinkage, sequential rounding, degenerate inputs."""
