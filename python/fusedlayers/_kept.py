"""Small tensors that layers keep between calls (batch sizes, zero states, permutations, empty placeholders)."""

from __future__ import annotations

from typing import Callable

import torch

_MEMOS: list[dict] = []  # module-level memos of kept tensors, emptied by fusedlayers.clear_weight_cache()


def memo_allowed() -> bool:
    """Whether a tensor may be kept for later calls now: not while a trace or compile records the call, nor under
    a torch_dispatch mode (FakeTensorMode), a torch_function mode (a `with torch.device(...)` block) or a
    torch.func transform, whose tensors must not outlive them."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active())


def kept(make: Callable[[], torch.Tensor]):
    """make()'s result, made outside inference mode and without grad, for a memo (where memo_allowed()).

    A tensor made inside torch.inference_mode() can neither be saved for a backward nor report its version, so
    one kept from an inference call would break the first training call after it."""
    with torch.inference_mode(False), torch.no_grad():
        return make()


def memo(table: dict) -> dict:
    """Registers a module-level memo, so that clear_memos() empties it."""
    _MEMOS.append(table)
    return table


def clear_memos() -> None:
    for table in _MEMOS:
        table.clear()
