"""The engine: everything one D2C run computes, below any I/O to the Hub or the command line.

`search` (pure: partitions and the D2C loop, sees only a score function and a seeded generator), `search_robust`
(pure: restarts and the final pass around it), `lora` (reading
LoRA weights and the checks before any merge), `layer_merge` (one layer's merge arithmetic and the one seam to
PEFT's private helpers), `merge_methods` (pure tensor maths of the rank-r update-space merges), `merging` (the merger and its LRU of temporary adapters), `tokenization` and `scoring` (tokenising
examples; the batched, memoised completion loss), `budget` (storage budgets to K), `checkpoint`, `distributed` (the only
importer of accelerate) and `state` (the model-state guard). May import `peft_d2c.config`, `peft_d2c.errors`,
`peft_d2c.io` and `peft_d2c.data`; never the Hub, evaluation, embedded or CLI stages.
"""
