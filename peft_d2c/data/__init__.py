"""Task data in: few-shot examples from mappings, datasets, and Hub or local data specs (`spec`), normalised to
`{task: [Example]}` (`examples`). May import `peft_d2c.config`, `peft_d2c.errors` and `peft_d2c.io` only.

`peft_d2c.data` also keeps offering what the flat-layout module of that name did.
"""

from .examples import Example, normalize_task_examples

__all__ = ["Example", "normalize_task_examples"]
