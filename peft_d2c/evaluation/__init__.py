"""Measuring merged adapters: greedy answers and exact match (`generation`), held-out scores of a routing and the
task x adapter loss matrix (`heldout`), K sweeps (`sweep`), run-time estimates (`estimate`) and plots (`plots`,
matplotlib optional). May import every stage below it: `config`, `data`, `engine`, `result` and `d2c`.

`peft_d2c.evaluation` also keeps offering what the flat-layout module of that name did.
"""

from .generation import BASE_ADAPTER, completion_loss, exact_match_accuracy, generate_answers, normalize_answer

__all__ = ["BASE_ADAPTER", "completion_loss", "exact_match_accuracy", "generate_answers", "normalize_answer"]
