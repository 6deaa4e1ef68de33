"""Registration helpers shared by the op families."""

import torch


def block_double_backward(op_name: str, family: str) -> None:
    """Registers an autograd rule on a backward op that raises: differentiating a backward is not supported."""
    def refuse(ctx, *grads):
        raise RuntimeError(f"fusedlayers: the {family} backward is not differentiable (no double backward)")

    torch.library.register_autograd(op_name, refuse, setup_context=lambda ctx, inputs, output: None)
