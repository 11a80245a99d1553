"""The reuse engine on Hugging Face causal LMs (docs/contract.md section 4): config, engine, token matching, the HF attention and
cache shims, what it knows about model families, and model loading."""
from .config import ReuseConfig
from .engine import GenerationOutput, ReferenceEntry, ReuseEngine
from .models import load_model
from .prompts import as_chat

__all__ = ["ReuseConfig", "ReuseEngine", "ReferenceEntry", "GenerationOutput", "load_model", "as_chat"]
