"""Checks and reports: summaries, diagnostics, eval, the HTML report, kernels, progress."""
