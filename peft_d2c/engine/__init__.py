"""The engine: everything one D2C run computes, below any I/O to the Hub or the command line.

Five subpackages, each owning one concern; imports between them flow one way (`tests/test_architecture.py`):

- `merge`: reading and checking adapters (the PEFT seam), update-space maths, the merger and its cache, byte budget
  and rank allocation; imports no other engine subpackage.
- `search`: partitions, moves, acceptance rules, schedules, starts, baselines; pure (no torch), except `starts`
  (K-means on the adapters' weights), which may import `merge`.
- `runtime`: checkpoints, process groups (the only importer of accelerate), the model-state guard; may import
  `search` (a checkpoint records the search state).
- `scoring`: tokenising, the batched loss, layer inputs; may import `merge` and `runtime`.
- `serving`: the prompt router and routed generation; may import `scoring`.

May import `peft_d2c.config`, `peft_d2c.errors`, `peft_d2c.io`, `peft_d2c.data` and the modules below them; never
the Hub, evaluation, embedded or CLI stages. This `__init__` imports nothing, so the pure search loads without torch.
"""
