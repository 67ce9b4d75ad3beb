"""Scoring merged adapters on the few-shot examples: tokenising, the batched loss, the layer inputs.

`tokenization` (the one tokenisation of an example, the one padded-batch helper, checks on the ids), `loss` (which
requests share a forward pass, the batched, memoised completion loss, `LossScorer`) and `layer_inputs` (every LoRA
layer's inputs on each adapter's own task, for the data-aware merges). May import `peft_d2c.data`,
`peft_d2c.errors`, `peft_d2c.sizes`, `peft_d2c.combination_types`, the engine's
`merge` (the merger whose adapters it scores) and `runtime` (the process groups that share the scoring work);
never `search` or `serving`. Exports nothing: import the modules.
"""
