"""pieval: Position Interpolation (Chen et al. 2023) for lm-eval and transformers.

Kept import-light on purpose: the lm-eval import hook and the CLI import this package
before they know whether torch is needed.
"""

__version__ = "0.1.0"
