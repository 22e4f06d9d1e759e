"""transferlab: transfer learning with a GPT-2 written by hand in NumPy.

    from transferlab import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=32, block_size=16), seed=0)
    logits, loss = model(idx, targets)
    grads = model.backward()

The map of the package is in docs/README.md.
"""
from .model import GPT, GPTConfig
from .weights import LoadReport

__all__ = ["GPT", "GPTConfig", "LoadReport"]
__version__ = "0.1.0"
