"""Evaluation: gold judges, metrics, the statistics of the evidence, and the per-cell measurements (evaluate)."""
