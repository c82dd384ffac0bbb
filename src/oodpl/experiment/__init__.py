"""Experiments: the method registry (methods), the benchmark, leave-one-domain-out selection, `oodpl train-rm`, the
results schema, the report and its plots, and the leverage study."""
