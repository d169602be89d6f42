"""Pipeline stages, one file each; every stage is file-in, file-out with one ``run()``.

The contract is ``edgeprune.stages.base``; ``edgeprune.pipeline`` imports each stage from its module.
This package imports nothing, so reading the contract does not import torch.
"""
