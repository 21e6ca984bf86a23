r"""Recording the factor pair of the weight gradient of low-rank layers.

A :class:`GradientRecorder` keeps, for every :class:`~lowrank_manifolds.nn.LowRankLinear`,
:class:`~lowrank_manifolds.nn.LowRankAdapterLinear` and
:class:`~lowrank_manifolds.nn.LowRankConv2d` of a model (and every correction of
:mod:`lowrank_manifolds.peft`: any :class:`~lowrank_manifolds.nn._common.ManifoldModule`, a module
with ``input_columns`` as a convolution), the layer input ``x`` and the
output gradient ``dY`` of the backward pass, so that the weight gradient
:math:`G = AB^\top` can be applied to any basis in :math:`O(b (m + n) r)` (``b`` the number
of rows: batch entries, or batch times output positions for a conv). :class:`~lowrank_manifolds.optim.DLRT`
uses it for what ``p.grad`` cannot give: :math:`G` on the new directions of its bases.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._linalg import mT

__all__ = ["GradientRecorder"]


def _recordable(module: nn.Module) -> Optional[Tensor]:
    """The low-rank parameter whose gradient this module's pair gives, or None."""
    from ..nn import is_lowrank_layer

    return module.point if is_lowrank_layer(module) else None


class _RecordHook:
    """Forward hook of a :class:`GradientRecorder` on one module. It records only for the
    module it was registered on (held weakly) and copies as an inert hook, so that a
    ``deepcopy`` or pickle of the model never feeds (or holds) the original recorder."""

    def __init__(self, recorder: "GradientRecorder", module: nn.Module):
        self._recorder = weakref.ref(recorder)
        self._module = weakref.ref(module)

    def __call__(self, module, inputs, output):
        recorder = self._recorder()
        if recorder is not None and module is self._module():
            recorder._record(module, inputs, output)

    def __deepcopy__(self, memo):
        return _InertHook()

    def __reduce__(self):
        return (_InertHook, ())


class _InertHook:
    """What a recorder's hook becomes in a copy of the model: nothing."""

    def __call__(self, module, inputs, output):
        return None


class GradientRecorder:
    r"""Record the factor pair of the weight gradient of low-rank layers.

    Linear layers (:class:`~lowrank_manifolds.nn.LowRankLinear`, weight ``weight``;
    :class:`~lowrank_manifolds.nn.LowRankAdapterLinear`, correction ``delta``, whose
    gradient is the same): for :math:`y = x W^\top (+ b)` the weight gradient is
    :math:`G = dY^\top x` (``m x n``, summed over all leading axes), recorded as
    :math:`(A, B) = (dY^\top, x^\top)` (``m x b`` and ``n x b``).

    Convolutions (:class:`~lowrank_manifolds.nn.LowRankConv2d`): the gradient of the
    matricised kernel (``out x in*kh*kw``) is :math:`G = AB^\top` with
    :math:`A` = ``dY`` reshaped to ``out x (N L)`` and :math:`B` = ``unfold(x)``
    (``in*kh*kw x (N L)``, the layer's stride, padding, dilation and padding mode),
    ``L = H' W'`` output positions. :meth:`pair` builds ``B`` on demand from the kept
    input, so between the backward pass and the step only ``x`` (which autograd keeps
    anyway) and ``dY`` (``N L out`` numbers) are held; the pair itself takes
    :math:`N L\,(\mathrm{out} + \mathrm{in}\,k_h k_w)` numbers while it is used
    (``unfold`` replicates each input pixel up to ``kh kw`` times).

    With either, any product :math:`GW`, :math:`G^\top Q` with an ``r``-column basis
    costs :math:`O(b (m + n) r)` (``b`` = batch rows, or ``N L`` for a conv).

    A forward hook on every such module keeps the input ``x`` (detached, no copy) and
    registers a tensor hook on the output that keeps ``dY`` when the backward pass
    reaches it.

    * A pair is stored only when the backward pass reached the output, so a forward
      without backward (evaluation) leaves nothing behind; nothing is recorded when
      grad mode is off or the weight does not require grad.
    * Several calls of the layer (weight sharing) or several backward passes before a
      step (gradient accumulation) add up, exactly as ``.grad`` does: the pairs are
      concatenated along the batch axis.
    * :meth:`clear` forgets everything; the optimizers call it in ``zero_grad`` and at
      the end of ``step``.
    * Copies: the hooks record only for the very modules they were registered on. A
      ``copy.deepcopy`` or pickle of the model carries inert hooks (an EMA or teacher
      copy never feeds this recorder); a deepcopy of the recorder (or of an optimizer
      holding one) hooks the copied modules afresh.
    * Do not modify a layer's input in place between ``backward`` and ``step``.

    Parameters
    ----------
    model : nn.Module
        Every recordable submodule gets hooks (:meth:`remove` takes them off).
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._hook_modules([m for m in model.modules() if _recordable(m) is not None])

    def _hook_modules(self, modules: List[nn.Module]) -> None:
        #: ``wants(param) -> bool``, optional: whether to record for ``param`` in a forward pass
        #: (the optimizer that reads the records sets it; None records every hooked layer).
        self.wants: Optional[Callable[[Tensor], bool]] = None
        self._records: Dict[int, List[Tuple[Tensor, Tensor]]] = {}
        self._modules = modules
        self._params: Dict[int, Tensor] = {}
        self._convs: Dict[int, nn.Module] = {}
        self._handles = []
        for module in modules:
            param = _recordable(module)
            self._params[id(param)] = param
            if callable(getattr(module, "input_columns", None)):  # a convolution: B = unfold(x)
                self._convs[id(param)] = module
            self._handles.append(module.register_forward_hook(_RecordHook(self, module)))

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new._hook_modules([copy.deepcopy(m, memo) for m in self._modules])
        return new

    def __getstate__(self):
        return {"modules": self._modules}

    def __setstate__(self, state):
        self._hook_modules(state["modules"])

    def _record(self, module: nn.Module, inputs, output) -> None:
        param = _recordable(module)
        if param is None or not (torch.is_grad_enabled() and param.requires_grad):
            return
        if self.wants is not None and not self.wants(param):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        key, x = id(param), inputs[0].detach()

        def grad_hook(dy):
            self._records.setdefault(key, []).append((x, dy.detach()))

        output.register_hook(grad_hook)

    def tracks(self, param: Tensor) -> bool:
        """Whether ``param`` belongs to a hooked layer."""
        return id(param) in self._params

    def pair(self, param: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        r"""``(A, B)`` (``m x b``, ``n x b``) with :math:`G = AB^\top`, or None if nothing
        was recorded for ``param`` since the last :meth:`clear`: ``(dY^T, x^T)`` for a
        linear layer, ``(dY`` as ``out x N L``, ``unfold(x))`` for a convolution."""
        recs = self._records.get(id(param))
        if not recs:
            return None
        conv = self._convs.get(id(param))
        if conv is None:
            xs = [x.reshape(-1, x.shape[-1]) for x, _ in recs]
            dys = [dy.reshape(-1, dy.shape[-1]) for _, dy in recs]
            a_parts = [mT(dy) for dy in dys]
            b_parts = [mT(x) for x in xs]
        else:
            a_parts, b_parts = [], []
            for x, dy in recs:
                if dy.dim() == 3:
                    dy = dy.unsqueeze(0)
                a_parts.append(dy.transpose(0, 1).reshape(dy.shape[1], -1))  # (N, out, H', W') -> (out, N L)
                b_parts.append(conv.input_columns(x))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, -1)
        b = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, -1)
        return a.to(param.dtype), b.to(param.dtype)

    def clear(self) -> None:
        """Forget all records."""
        self._records.clear()

    def remove(self) -> None:
        """Remove the hooks and the records."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
