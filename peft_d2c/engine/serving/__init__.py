"""Answering prompts with merged adapters: the prompt router and routed generation.

`generation` (greedy answers with one adapter per prompt: the one generation loop) and `prompt_router`
(`PromptRouter`: which merged adapter answers a prompt without a task label, its files). May import `peft_d2c.io`
and the engine's `scoring` (tokenising, the input device); never `search` or `runtime`. Exports nothing: import the
modules.
"""
