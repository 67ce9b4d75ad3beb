"""Merging LoRA adapters: everything that reads, checks or combines adapter weights.

`lora` (reading LoRA weights and the checks before any merge), `layer_merge` (one layer's merge arithmetic and the
one seam to PEFT's private helpers), `merge_methods` (pure tensor maths of the rank-r update-space merges),
`regmean` (pure tensor maths of the data-aware merge), `update_layers` (update-space merges written into a merged
adapter's layers), `merging` (the merge weights and seeds, the merger and its LRU of temporary adapters), `budget`
(storage budgets to K, merged sizes), `rank_budget` (one byte budget spent over every module's rank) and
`task_cores` (a shared basis per cluster and an r x r core per task). May import
`peft_d2c.combination_types`, `peft_d2c.config`, `peft_d2c.errors`, `peft_d2c.names` and `peft_d2c.sizes`; imports
no other engine subpackage (scoring, search, runtime and serving build on it). Exports nothing: import the modules.
"""
