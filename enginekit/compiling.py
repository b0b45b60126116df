"""``Engine(compile=...)``: torch.compile of the model, never of the loop.

The engine keeps the plain module as ``engine.model`` (so ``state_dict()`` keys have no
``_orig_mod.`` prefix and a compiled run resumes an eager checkpoint and back) and runs the
forward passes through a compiled wrapper of the module that trains: the DDP wrapper under
torchrun (PyTorch compiles DDP from outside, so its optimizer can split graphs at gradient
buckets), the plain module otherwise. Hooks are Python calls between compiled regions and fire
exactly as in eager mode.

What compiles, and when:

* the first training step compiles forward and backward (seconds for a tiny model, minutes for
  124M on a CPU); the engine prints a line before it and one after it;
* evaluation in eval mode under ``no_grad`` compiles once more (dynamo guards on the training
  flag and grad mode); afterwards both graphs are cached and switching costs nothing;
* a batch of another shape (a short last batch) recompiles once, after which dynamo treats that
  dimension as dynamic;
* generation (SampleText) runs the eager model: every new length would be a new shape, and a
  sample once per epoch does not repay a compile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["CompiledModules", "compile_options"]

#: torch.compile's keyword arguments that a caller may pass in ``Engine(compile={...})``.
_ALLOWED = tuple(p for p in inspect.signature(torch.compile).parameters if p != "model")


def compile_options(compile: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``compile=`` as torch.compile keyword arguments, or None when compiling is off."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, Mapping):
        raise ValueError(
            f"compile must be True, False or a dict of torch.compile arguments, got {type(compile).__name__}"
        )
    unknown = sorted(set(compile) - set(_ALLOWED))
    if unknown:
        raise ValueError(
            f"compile: unknown torch.compile argument(s) {', '.join(map(repr, unknown))}; "
            f"the arguments are {', '.join(_ALLOWED)}"
        )
    return dict(compile)


class CompiledModules:
    """One compiled wrapper per module it is asked for (the training module, the plain model),
    built on first use and kept, so a wrapper's graphs are reused across steps and evaluations."""

    def __init__(self, options: dict[str, Any], say: Callable[[str], None]) -> None:
        self.options = options
        self._say = say
        self._wrappers: dict[int, tuple[nn.Module, nn.Module]] = {}
        #: True until the first training step's compile has been announced as finished
        self.first_step_pending = True

    def of(self, module: nn.Module) -> nn.Module:
        """The compiled wrapper of ``module`` (the same object on every call)."""
        entry = self._wrappers.get(id(module))
        if entry is not None and entry[0] is module:
            return entry[1]
        if not self._wrappers:
            self._say(
                "torch.compile: the first step compiles the model (tens of seconds for a tiny model, "
                "minutes for 124M on a CPU); later steps reuse it"
            )
        compiled: nn.Module = torch.compile(module, **self.options)  # type: ignore[assignment]
        self._wrappers[id(module)] = (module, compiled)
        return compiled
