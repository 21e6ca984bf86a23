r"""Counting what a piece of code asks of the device: operators, kernels and host reads.

A GPU runs each operator that computes as at least one kernel launch (several microseconds
each, whatever the size), and each read of a value back to the host as a synchronisation that
stalls the launch queue. :class:`OpCounter` counts both for any code run inside it, on any
device (the CPU included, where neither costs much, so that a test here tells what a GPU would
pay):

.. code-block:: python

    with OpCounter() as count:
        optimizer.step()
    count.kernels, count.reads, count.by_name.most_common(5)

It is a ``TorchDispatchMode``: it sees the aten operators below autograd, after the Python
layer, so a value read in C++ by ``Tensor.tolist`` or ``Tensor.numpy`` would pass unseen; those
two methods are wrapped while the counter is active.
"""
from __future__ import annotations

import collections
from typing import Counter, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]

# operators whose result is a value on the host, or whose output shape depends on the data
# (the device must be waited for before the shape is known)
_READS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "nonzero_static",
                    "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                    "repeat_interleave"})


def _is_view(func) -> bool:
    """Whether ``func`` only makes a new view of its input (no kernel): its result aliases an
    input without writing it, as ``view``, ``expand``, ``select`` or ``detach`` do."""
    if func.overloadpacket.__name__ == "_unsafe_view":  # a view declared as a new tensor
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _reads(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _READS:
        return name != "repeat_interleave" or kwargs.get("output_size") is None
    if name == "index":  # a boolean mask index is a nonzero
        return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)
    if name in ("_to_copy", "copy_"):  # a device-to-host copy
        src = args[1] if name == "copy_" else args[0]
        dst_cpu = (args[0].device.type == "cpu") if name == "copy_" else (
            torch.device(kwargs.get("device") or src.device).type == "cpu")
        return src.device.type not in ("cpu", "meta") and dst_cpu
    return False


class OpCounter(TorchDispatchMode):
    """Counts the aten operators run inside it (a context manager).

    Attributes
    ----------
    ops : int
        Every operator, views included.
    kernels : int
        The operators that compute (views excluded): on a GPU, a lower bound on the kernel
        launches.
    reads : int
        Data-dependent host reads: ``item``, ``bool()`` / ``float()`` of a tensor, ``equal``,
        ``nonzero`` and the operators built on it (boolean-mask indexing, ``masked_select``,
        ``unique``), a device-to-host copy, and calls of ``Tensor.tolist`` / ``Tensor.numpy``
        (on a GPU, each is a synchronisation; a read of a CPU tensor is counted too).
    by_name : collections.Counter
        Operators by name (``"mm"``, ``"view"``, ...); ``"tolist"`` and ``"numpy"`` for those calls.
    exempt_reads : int
        Reads of the ``exempt`` tensors, in neither ``reads`` nor ``kernels``.

    Parameters
    ----------
    exempt : iterable of Tensor, optional
        Tensors whose reads are not counted in ``reads`` or ``kernels`` (``exempt_reads`` instead): e.g. the
        0-dim step counters that ``torch.optim``'s Adam keeps on the CPU on every device and
        reads once per parameter, which cost no synchronisation.
    """

    def __init__(self, exempt: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.ops = self.kernels = self.reads = self.exempt_reads = 0
        self._exempt = {t.data_ptr() for t in exempt}
        self.by_name: Counter[str] = collections.Counter()
        self._saved: Optional[dict] = None
        self._inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if _reads(func, args, kwargs) and args and torch.is_tensor(args[0]) and args[0].data_ptr() in self._exempt:
            self.exempt_reads += 1
        else:
            self.kernels += not _is_view(func)
            self.reads += _reads(func, args, kwargs)
        self.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        # the methods as torch.Tensor's own dictionary holds them (None: inherited from C++)
        self._saved = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "numpy")}
        for name in self._saved:
            setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, method in self._saved.items():
                if method is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, method)
            self._saved = None

    def _counted(self, name: str, method):
        def counted(tensor, *args, **kwargs):
            if self._inside:  # a torch function mode (the default device, ...) calls the method again
                return method(tensor, *args, **kwargs)
            self.reads += 1
            self.by_name[name] += 1
            self._inside = True
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._inside = False

        counted.__doc__ = method.__doc__
        return counted
