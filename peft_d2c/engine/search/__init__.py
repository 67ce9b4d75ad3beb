"""The D2C search: partitions, moves, acceptance rules, schedules, starts and baselines.

`loop` (partitions, the D2C loop, the K-means baselines), `proposals` (which move a step proposes),
`search_robust` (restarts, the final pass, combined starts), `search_phases` (the paper's steps, then partition
steps), `weight_search` (a seeded (1+1)-ES over one cluster's merge weights) and `starts` (the start partitions).
All but `starts` are pure: they import only numpy, the standard library and `peft_d2c.search_defaults`, see the
adapters by name and ask a score function for losses, so a test drives them with toy functions and no torch.
`starts` (K-means on the adapters' weights) may import `peft_d2c.config` and `engine.merge.lora`. This `__init__`
imports nothing, so loading a pure module never loads `starts` or torch.
"""
