"""Fixed-rank matrix manifolds, dynamical low-rank integrators and low-rank
training for PyTorch and geoopt.

Where things live:

- ``lowrank_manifolds.FixedRankManifold``: the manifold (a geoopt manifold; points
  are packed ``[U; S; V]`` tensors usable as ``geoopt.ManifoldParameter``);
- ``lowrank_manifolds.integrators``: dynamical low-rank integrators (KSL, BUG,
  augmented and parallel BUG, abc-PSI) and rank truncation;
- ``lowrank_manifolds.nn``: low-rank layers (``layers``), adapters (``adapter``) and model
  conversion (``convert``);
- ``lowrank_manifolds.optim``: low-rank optimizers: ``geometric`` (GeometricSGD/Adam),
  ``dlrt`` (DLRT) with its gradient ``recorder``, ``lora_pre`` (LoRAPreAdam), the shared
  step loop in ``_base``;
- ``lowrank_manifolds.completion``: the sampled least-squares loss of matrix completion from
  sparse kernels (``Observations``);
- ``lowrank_manifolds.testing``: Hypothesis strategies and checks (needs hypothesis);
- ``lowrank_manifolds.lab``: the integrator lab (test problems and studies);
- ``lowrank_manifolds.hf``: Hugging Face ``Trainer`` glue (needs the ``hf`` extra; imported
  only when used).
"""
import warnings as _warnings

with _warnings.catch_warnings():
    # geoopt 0.5.1 scripts its functions when imported, and torch deprecates torch.jit.script:
    # 73 warnings about geoopt, none about the user's code. Silenced for that import only.
    _warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
    import geoopt as _geoopt  # noqa: F401

from . import integrators, nn, optim
from .manifold import FixedRankManifold

__version__ = "0.1.0"

del _warnings, _geoopt

__all__ = ["FixedRankManifold", "integrators", "nn", "optim", "__version__"]
