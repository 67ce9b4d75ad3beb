"""The Hugging Face Hub: adapters in (`adapters`: folders, repos, collections), results out (`push`: one commit per
repo, `cards`: the model cards), and collections back with the task router (`collection`). Everything goes through
`huggingface_hub`. May import `peft_d2c.config`, `peft_d2c.errors`, `peft_d2c.io` and `peft_d2c.engine`.
"""

from .adapters import AdapterSource, load_adapters
from .cards import build_adapter_card, build_collection_card
from .collection import D2CRouter, load_d2c_collection
from .push import D2CPushError, D2CPushResult, push_d2c_folder

__all__ = [
    "AdapterSource",
    "D2CPushError",
    "D2CPushResult",
    "D2CRouter",
    "build_adapter_card",
    "build_collection_card",
    "load_adapters",
    "load_d2c_collection",
    "push_d2c_folder",
]
