"""Named launch arguments for the Triton kernels: the launchers name every runtime argument, this orders them.

A Triton kernel's runtime parameters (everything not annotated ``tl.constexpr``) are passed
positionally: Triton's autotuner keys its memo, prunes its candidates and runs its hooks from the
positional arguments (``Autotuner.nargs``), so keyword arguments would change what it sees. The
launchers therefore build a ``dict`` keyed by the kernel's parameter names and call
:func:`ordered_args`, which returns them in the kernel's order and refuses a missing or unknown name
(a launcher/kernel mismatch is a bug of this package: ``TypeError``, never a silently shifted
argument). The parameter names are read once per kernel (``inspect`` on the decorated function; no
Triton import here), so a launch pays one length check and one ``itemgetter`` call.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Callable

__all__ = ["runtime_params", "ordered_args"]


def _python_function(kernel: Any) -> Callable[..., Any]:
    """The plain Python function under Triton's wrappers (``Autotuner.fn`` → ``JITFunction.fn`` → function)."""
    fn = kernel
    for _ in range(8):  # autotune / heuristics / jit wrappers, each holding the next one in ``.fn``
        if inspect.isfunction(fn):
            return fn
        fn = getattr(fn, "fn", None)
    if not inspect.isfunction(fn):
        raise TypeError(f"ordered_args: kernel is not a Triton kernel wrapping a Python function; got {kernel!r}")
    return fn


def _is_constexpr(annotation: Any) -> bool:
    # ``from __future__ import annotations`` keeps annotations as strings ("tl.constexpr")
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return name.split(".")[-1] == "constexpr"


@functools.lru_cache(maxsize=64)
def _signature(fn: Callable[..., Any]) -> tuple[tuple[str, ...], Callable[[dict[str, Any]], Any]]:
    names = tuple(p.name for p in inspect.signature(fn).parameters.values() if not _is_constexpr(p.annotation))
    return names, operator.itemgetter(*names)


def runtime_params(kernel: Any) -> tuple[str, ...]:
    """The kernel's runtime (non-``constexpr``) parameter names, in order."""
    return _signature(_python_function(kernel))[0]


def ordered_args(kernel: Any, named: dict[str, Any]) -> tuple[Any, ...]:
    """``named``'s values in ``kernel``'s parameter order; ``TypeError`` if the names differ from the kernel's."""
    names, getter = _signature(_python_function(kernel))
    ok = len(named) == len(names)
    if ok:
        try:  # equal counts and every kernel name present: the same names
            got = getter(named)
        except KeyError:
            ok = False
    if not ok:
        missing = [n for n in names if n not in named]
        extra = [n for n in named if n not in names]
        raise TypeError(f"ordered_args: the launch arguments do not match {_python_function(kernel).__name__}'s "
                        f"parameters; expected exactly {list(names)}, got missing {missing} and unknown {extra}")
    return got if len(names) > 1 else (got,)
