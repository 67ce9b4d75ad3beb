"""The embedded default: SmolLM2-135M-Instruct (`base_model`: Hub, or the GGUF copy on PyPI), 16 real tasks
shipped in `task_data/` (`tasks`), one LoRA adapter per task trained and cached (`adapters`), the README's main job
(`mainjob`) and the benchmark (`benchmark`). Sits above the library it demonstrates: may import every stage but
the CLI.
"""

from .adapters import (
    DEFAULT_RECIPE,
    AdapterRecipe,
    adapter_cache_dir,
    build_embedded_adapters,
    load_embedded_peft_model,
    task_seed,
    train_task_adapter,
)
from .base_model import EMBEDDED_MODEL_ID, default_cache_dir, load_embedded_base_model
from .tasks import EMBEDDED_TASK_NAMES, EMBEDDED_TASKS_DIR, load_embedded_tasks

__all__ = [
    "DEFAULT_RECIPE",
    "EMBEDDED_MODEL_ID",
    "EMBEDDED_TASKS_DIR",
    "EMBEDDED_TASK_NAMES",
    "AdapterRecipe",
    "adapter_cache_dir",
    "build_embedded_adapters",
    "default_cache_dir",
    "load_embedded_base_model",
    "load_embedded_peft_model",
    "load_embedded_tasks",
    "task_seed",
    "train_task_adapter",
]
