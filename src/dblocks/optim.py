"""torch's AdamW without paying for torch.compile's import when nothing is compiled.

torch 2.x guards its optimizers against being traced by ``torch.compile``, and the guards import
``torch._dynamo`` (and with it inductor, sympy and most of torch.distributed: about 1.2 s of a 2-core job's
start, and ~0.2 s more at exit, where dynamo prints its compile-time table) even in a process that never
compiles anything:

* ``Optimizer.add_param_group`` / ``state_dict`` / ``load_state_dict`` / ``zero_grad`` are decorated with
  ``torch._compile._disable_dynamo``, whose wrapper imports ``torch._dynamo`` on its first call to build
  ``torch._dynamo.disable(fn)`` and caches that on the plain function as ``fn.__dynamo_disable``;
* ``Adam.step`` is decorated with ``torch.optim.optimizer._use_grad_for_differentiable``, which imports
  ``torch._dynamo`` on every call, sets grad mode to ``defaults["differentiable"]``, calls
  ``torch._dynamo.graph_break()`` (a no-op outside compilation) around the real step and restores grad mode.

:func:`adamw` returns a :class:`torch.optim.AdamW` (the subclass :class:`AdamW`) whose update is torch's own
(nothing of Adam's math is re-implemented here) but that skips those imports while ``torch._dynamo`` is not
loaded. Once something else has imported ``torch._dynamo``, both paths fall back to torch's own wrappers, so a
process that does compile gets exactly the stock behaviour. Where torch's internals differ from what this
module expects, :func:`adamw` returns the stock optimizer.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

_DYNAMO = "torch._dynamo"


def _probe() -> None:  # never called: only wrapped, to learn the code objects of torch's wrappers
    pass


def _code(fn: Any):
    return getattr(fn, "__code__", None)


def _closure(fn: Callable) -> dict[str, Any]:
    code, cells = fn.__code__, fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _internals() -> tuple[Callable, Callable, Any] | None:
    """(``_use_grad`` wrapper of AdamW's step, the undecorated step, ``_disable_dynamo``'s wrapper code), as
    found in the installed torch; None if it is not built the way this module expects."""
    try:
        from torch.optim import optimizer as optimizer_module

        use_grad_code = optimizer_module._use_grad_for_differentiable(_probe).__code__
        hook_code = torch.optim.Optimizer.profile_hook_step(_probe).__code__
        inner_code = torch._compile._disable_dynamo(_probe).__code__
        step = torch.optim.AdamW.step
        while _code(step) is hook_code:  # the profiler hook torch adds to the class of the first instance
            step = step.__wrapped__
        if _code(step) is not use_grad_code:
            return None
        raw = step.__wrapped__
        if not callable(raw) or _code(raw) in (hook_code, use_grad_code, inner_code) or _code(raw) is None:
            return None
        return step, raw, inner_code
    except (AttributeError, TypeError, ImportError):
        return None


_INTERNALS = _internals()


@functools.cache
def _disabled(fn: Callable, recursive: bool) -> Callable:
    """What ``_disable_dynamo`` would have cached: ``torch._dynamo.disable(fn)`` (imports torch._dynamo)."""
    import torch._dynamo

    return torch._dynamo.disable(fn, recursive, wrapping=False)


def _eager_until_dynamo(fn: Callable, recursive: bool) -> Callable:
    """``fn`` itself while ``torch._dynamo`` is not imported, torch's dynamo-disabled ``fn`` once it is."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _DYNAMO in sys.modules:
            return _disabled(fn, recursive)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=1)
def _resolve_disable_caches() -> bool:
    """Pre-resolve the ``__dynamo_disable`` caches of the optimizer methods wrapped by ``_disable_dynamo``
    (process-wide, once), so that their first call does not import torch._dynamo.

    Why this is safe: ``torch._dynamo.disable(fn)`` only changes anything while torch.compile is tracing;
    called eagerly it just calls ``fn``. This package never compiles, and the cache is only filled while
    ``torch._dynamo`` has not been imported (so nothing can be compiling, which ``is_compiling`` confirms).
    Should anything import torch._dynamo later (to compile, say), the cached function defers to the real
    ``torch._dynamo.disable(fn)`` from then on, so a compiled caller still sees these methods disabled."""
    if _INTERNALS is None or _DYNAMO in sys.modules or torch.compiler.is_compiling():
        return False
    inner_code = _INTERNALS[2]
    for klass in torch.optim.AdamW.__mro__:
        for attr in vars(klass).values():
            if _code(attr) is not inner_code:
                continue
            scope = _closure(attr)
            fn = scope.get("fn")
            if fn is None or getattr(fn, "__dynamo_disable", None) is not None:
                continue
            setattr(fn, "__dynamo_disable", _eager_until_dynamo(fn, bool(scope.get("recursive", True))))
    return True


class AdamW(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` whose ``step`` does not import ``torch._dynamo`` (see the module's
    docstring); build it with :func:`adamw`."""

    def step(self, closure=None):
        use_grad, raw, _ = _INTERNALS
        if _DYNAMO in sys.modules:  # something may compile: torch's own wrapper, graph breaks and all
            return use_grad(self, closure)
        # what _use_grad_for_differentiable does outside torch.compile (its graph breaks are no-ops there)
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return raw(self, closure)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, the same update bit for bit, without importing
    ``torch._dynamo`` when the process has not imported it (the stock class if torch's internals differ)."""
    if _INTERNALS is None:
        return torch.optim.AdamW(params, **kwargs)
    _resolve_disable_caches()
    return AdamW(params, **kwargs)
