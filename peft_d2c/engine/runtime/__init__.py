"""What a run needs around the computation: checkpoints, process groups, the model-state guard.

`checkpoint` (run fingerprint, checkpoint save / load, `SearchCheckpointer`), `distributed` (Accelerate process
groups: the only module of peft-d2c that imports `accelerate`) and `state` (`ModelState`: what every operation on a
user's model gives back untouched). May import `peft_d2c.config`, `peft_d2c.errors`, `peft_d2c.io` and the engine's
`search` (a checkpoint records the search state); never `merge`, `scoring` or `serving`. Exports nothing: import
the modules.
"""
