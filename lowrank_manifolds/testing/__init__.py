"""Property-based testing tools for fixed-rank geometry: Hypothesis strategies
(``strategies``) and check functions that users can run on their own code, and
:class:`OpCounter` (``counting``), which counts the kernels and host reads of a step."""
from .checks import CheckReport, CheckResult, check_integrator, check_retraction
from .counting import OpCounter
from .strategies import SPECTRA, fixed_rank_manifolds, make_point, make_tangent, manifolds_and_points, points, tangent_vectors

__all__ = ["CheckReport", "CheckResult", "OpCounter", "check_integrator", "check_retraction", "SPECTRA",
           "fixed_rank_manifolds", "make_point", "make_tangent", "manifolds_and_points", "points", "tangent_vectors"]
