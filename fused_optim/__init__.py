"""fused_optim: fused multi-tensor kernels for the glue ops of PyTorch training.

Every op is a torch custom op (``torch.ops.fused_optim.*``) with a C++ CPU kernel, and a
pure-Python reference kernel that runs wherever no native kernel is registered (or when
``FUSED_OPTIM_DISABLE_EXT=1``). ``backend_info()`` says which is active.
"""

from ._library import backend_info
from ._route import last_route
from .ensemble import ModelEnsemble
from .dropout import CustomDropout, Dropout, dropout, unpack_dropout_mask
from .structured_dropout import (
    Dropout1d,
    Dropout2d,
    Dropout3d,
    DropPath,
    StochasticDepth,
    drop_path,
    drop_path_add,
    dropout1d,
    dropout2d,
    dropout3d,
    stochastic_depth,
)
from .averaging import (
    ModelEMA,
    average_model_weights,
    average_state_dicts,
    average_tensors,
    ema_update_,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
    greedy_soup,
    swa_update_,
    uniform_soup,
)
from .convert import convert
from .patch import Patch, patch
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_gradients, clip_grads_with_norm_, get_total_norm
from .flat import FlatParameters, flatten_parameters
from .regularization import L1L2Regularizer, l1l2_grad_, l1l2_penalty
from .pre_step import AttachHandle, attach, pre_step_
from .training import EarlyStopping, GradientAccumulator, train_with_gradient_clipping

__version__ = "0.1.0"

__all__ = [
    "AttachHandle",
    "CustomDropout",
    "EarlyStopping",
    "FlatParameters",
    "GradientAccumulator",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropPath",
    "StochasticDepth",
    "L1L2Regularizer",
    "Patch",
    "ModelEMA",
    "ModelEnsemble",
    "average_model_weights",
    "average_state_dicts",
    "average_tensors",
    "attach",
    "backend_info",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_gradients",
    "convert",
    "clip_grads_with_norm_",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "flatten_parameters",
    "ema_update_",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "greedy_soup",
    "get_total_norm",
    "l1l2_grad_",
    "l1l2_penalty",
    "last_route",
    "patch",
    "pre_step_",
    "stochastic_depth",
    "swa_update_",
    "train_with_gradient_clipping",
    "uniform_soup",
    "unpack_dropout_mask",
]
