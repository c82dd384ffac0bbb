"""Preference data: records and readers, built-in tasks, hub loaders and the meta-train / held-out split.

See docs/data.md for the built-in domains and the pairing rules.
"""

from oodpl.data.records import PairRecord, PromptRecord, read_pairs, read_prompts, write_jsonl
from oodpl.data.split import DomainSplit, HeldOutDomain, MetaTrainDomain, build_split, domain_stats

__all__ = [
    "PairRecord",
    "PromptRecord",
    "read_pairs",
    "read_prompts",
    "write_jsonl",
    "DomainSplit",
    "HeldOutDomain",
    "MetaTrainDomain",
    "build_split",
    "domain_stats",
]
