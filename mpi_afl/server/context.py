"""The algorithm's view of the run (algorithms/base.py `ServerContext`), built alike on the server and on a
distilling rank."""

from __future__ import annotations

import numpy as np
import torch

from ..algorithms.base import ServerContext
from ..config import Config
from ..models import flat


def check_images(splits, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """ServerContext.check_x/check_y: the first n validation images, or test images without a validation
    split (fixed for the whole run, so every KD call is measured on the same images); none for n = 0."""
    x, y = (splits.val_x, splits.val_y) if len(splits.val_x) else (splits.test_x, splits.test_y)
    return {"check_x": x[:n].to(device), "check_y": y[:n].to(device)} if n else {}


def algorithm_context(cfg: Config, device: torch.device, x: torch.Tensor, model: torch.nn.Module, make_model, splits,
                      histograms: np.ndarray, group, **extra) -> ServerContext:
    """The run as an algorithm sees it at version 0 with the flat model `x` of `model`."""
    info = splits.info
    return ServerContext(
        cfg=cfg, device=device, global_model=x, version=0, snapshot=extra.pop("snapshot", None),
        make_model=make_model, param_mask=flat.param_mask(model).to(device), num_classes=info.num_classes,
        image_shape=(info.channels, info.image_size, info.image_size), data_mean=tuple(info.mean),
        data_std=tuple(info.std), client_histograms=histograms,
        kd_x=splits.kd_x.to(device) if len(splits.kd_x) else None,
        kd_y=splits.kd_y.to(device) if len(splits.kd_y) else None, group=group, **extra)
