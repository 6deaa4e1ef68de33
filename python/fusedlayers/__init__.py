"""fusedlayers: fused C++ kernels for LSTM, attention and masked autoregressive flows, as drop-in torch layers.

    import fusedlayers
    lstm = fusedlayers.nn.LSTM(256, 512)          # same arguments and state_dict as torch.nn.LSTM
    model = fusedlayers.convert(model)            # swap every supported torch layer in a model, weights kept
"""

import torch  # must be loaded before the extension, which links against it

from ._build_info import TORCH_VERSION as _BUILT_WITH_TORCH

__version__ = "0.1.0"


def _check_torch_version() -> None:
    # A binary extension only works with the torch it was compiled against; say so instead of failing later with
    # an undefined symbol.
    if torch.__version__ != _BUILT_WITH_TORCH:
        raise ImportError(
            f"fusedlayers was built against torch {_BUILT_WITH_TORCH}, but torch {torch.__version__} is installed. "
            "Rebuild it for this torch with:  pip install --no-build-isolation --force-reinstall --no-deps ."
        )


_check_torch_version()

from . import _C  # noqa: E402  (registers the ops)
from . import _ops  # noqa: E402  (fake-tensor and autograd rules)
from . import flows, functional, nn  # noqa: E402
from .convert import convert  # noqa: E402
from ._info import info  # noqa: E402
from ._info import clear_weight_cache, set_weight_cache_enabled  # noqa: E402

__all__ = ["flows", "functional", "nn", "convert", "info", "clear_weight_cache", "set_weight_cache_enabled", "__version__"]
