"""The D2C search: partitions, moves, the acceptance rules, the plan of a run, starts and baselines.

`plan` (`SearchPlan`: the rule, T, start and limits a run takes, resolved once), `loop` (partitions, moves, the one
D2C loop, the K-means baselines), `weight_search` (a seeded (1+1)-ES over one cluster's merge weights) and `starts`
(the start partitions). All but `starts` are pure: they import only numpy, the standard library and
`peft_d2c.config` (`plan`), see the adapters by name and ask a score function for losses, so a test drives them with
toy functions and no torch. `starts` (K-means on the adapters' weights) may import `peft_d2c.config` and
`engine.merge.lora`. This `__init__` imports nothing, so loading a pure module never loads `starts` or torch.
"""
