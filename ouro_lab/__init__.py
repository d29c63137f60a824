"""ouro-lab: how much compute can a looped language model skip, per token, and at what cost."""

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "save_model", "OuroConfig", "OuroForCausalLM",
           "LoopOutput", "KVCache", "exit_distribution", "__version__"]


def __getattr__(name):  # lazy: `import ouro_lab` must not import torch (fast CLI start-up)
    if name in ("load_model", "load_tokenizer", "save_model"):
        from ouro_lab import loading
        return getattr(loading, name)
    if name in ("OuroConfig", "OuroForCausalLM", "LoopOutput", "KVCache", "exit_distribution"):
        from ouro_lab import model
        return getattr(model, name)
    raise AttributeError(f"module 'ouro_lab' has no attribute {name!r}")
