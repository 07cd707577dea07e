"""The reference model: `from models import GPT, GPTConfig`."""

from models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
