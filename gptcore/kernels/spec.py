"""A kernel launch as data: the one place a kernel's argument list is spelled.

Each kernel module has one spec function per kernel that returns a `LaunchSpec` (the compiled kernel, the
grid and the arguments by the kernel's parameter names) from the tensors and a tile config passed by
keyword. `launch` runs one; the compile gate (gptcore.kernels.compile) turns the same spec into an
ahead-of-time signature and the tuner's CPU test records it, so an argument added to a kernel is added in
one place and anything out of step fails on a CPU.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import cuda.tile as ct

from gptcore.kernels.runtime import ensure_cuda_context, stream_handle

ConstInt = ct.Constant[int]
ConstBool = ct.Constant[bool]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: grid sizes."""
    return -(-a // b)


@functools.cache
def parameters(body: Callable) -> tuple[tuple[str, bool], ...]:
    """The kernel function's parameters in order, each with whether it is a compile-time constant."""
    hints = typing.get_type_hints(body, include_extras=True)
    return tuple((name, hints.get(name) in (ConstInt, ConstBool)) for name in inspect.signature(body).parameters)


@functools.cache
def _names(body: Callable) -> tuple[str, ...]:
    return tuple(name for name, _ in parameters(body))


@dataclass(frozen=True)
class LaunchSpec:
    body: Callable  # the kernel's Python function: its parameter names are the argument names
    kernel: object  # body compiled by ct.kernel with its hints (occupancy, warps)
    grid: tuple[int, int, int]
    args: dict[str, object]

    @property
    def name(self) -> str:
        return self.body.__name__

    def ordered_args(self) -> tuple:
        """The arguments in the kernel's parameter order; a missing or unknown name is a TypeError naming it."""
        names = _names(self.body)
        try:
            values = tuple(map(self.args.__getitem__, names))
        except KeyError:
            values = None
        if values is None or len(self.args) != len(names):  # every name found and as many: none unknown
            missing = [n for n in names if n not in self.args]
            unknown = [n for n in self.args if n not in names]
            raise TypeError(f"{self.name}: arguments missing {missing}, unknown {unknown}")
        return values


def launch(spec: LaunchSpec, device_index: int) -> None:
    """Launch on the device's current stream (its context made current first: autograd's backward thread
    may have none)."""
    ensure_cuda_context(device_index)
    ct.launch(stream_handle(device_index), spec.grid, spec.kernel, spec.ordered_args())
