"""Registration helpers shared by the op families."""

import torch


def block_double_backward(op_name: str, family: str) -> None:
    """Registers an autograd rule on a backward op that raises: differentiating a backward is not supported."""
    def refuse(ctx, *grads):
        raise RuntimeError(f"fusedlayers: the {family} backward is not differentiable (no double backward)")

    torch.library.register_autograd(op_name, refuse, setup_context=lambda ctx, inputs, output: None)


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    # The casts of torch.library.register_autocast: floating tensors on the device, but not float64.
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, device_type, dtype) for v in value)
    return value


_autocast_libraries: list = []  # the registrations last as long as their Library objects


def register_autocast_current_dtype(op_name: str, device_type: str, run=None) -> None:
    """`torch.library.register_autocast`, but casting to the autocast dtype in effect at the call
    (`torch.get_autocast_dtype(device_type)`: bfloat16 or float16), as torch's own ops do, instead of one dtype
    fixed at registration. `run(op, args, dtype)`, if given, runs the op on the cast arguments."""
    namespace, name = op_name.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    dispatch_key = getattr(torch._C.DispatchKey, key)

    def autocast_impl(*args, **kwargs):
        if kwargs:
            raise AssertionError("Custom ops do not support kwargs yet.")
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            args = _autocast_cast(args, device_type, dtype)
            return run(op, args, dtype) if run is not None else op(*args)

    if op.has_kernel_for_dispatch_key(dispatch_key):
        op.py_kernels.pop(dispatch_key)
    op.py_impl(dispatch_key)(autocast_impl)
    lib = torch.library.Library(namespace, "FRAGMENT")
    _autocast_libraries.append(lib)
    lib.impl(name, lambda _keyset, *args, **kwargs: autocast_impl(*args, **kwargs), key, with_keyset=True)
