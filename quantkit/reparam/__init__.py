"""Reparameterization stage: QA-RepVGG blocks and Conv+BN fused into deploy-form convolutions.

Entry: :func:`reparameterize` (model -> fused copy).
"""

from quantkit.reparam.fuse import find_unfused_batchnorms, reparameterize

__all__ = ["reparameterize", "find_unfused_batchnorms"]
