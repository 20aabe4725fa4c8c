"""What every registry WRN offers beyond ``forward``: timm's model interface (``num_features``,
``forward_features`` -> the last feature map, ``forward_head(x, pre_logits)``,
``get_classifier``/``reset_classifier``, ``forward_intermediates``, activation checkpointing,
``group_matcher``), written once for both families.

A family builds its stem, ``stage_names`` (its stages, in order), ``forward_post`` (the CIFAR
nets' final BN-ReLU; nothing on ImageNet) and ``feature_info`` (one entry per stage), then
calls ``init_head``. Its ``forward_features`` is written out (TorchScript compiles it): stem,
stages (through timm's ``checkpoint_seq`` when ``set_grad_checkpointing`` is on: activations
are re-computed in backward, the gradients are the same), ``forward_post``.

timm's standard model arguments (what its ``train.py`` passes to ``create_model``) mean here
what they mean in timm's ``resnet.py``: ``drop_rate`` is dropout on the pooled features before
the classifier, ``drop_path_rate`` stochastic depth on the residual branches (``drop_path_rates``),
``global_pool`` the pooling; ``bn_momentum``/``bn_eps`` go to every BatchNorm through the norm
layer (``batchnorm``), as timm's EfficientNets take them. Their defaults change nothing."""

from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier, get_device_dtype
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices  # not exported by timm.models


def check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def batchnorm(bn_momentum: Optional[float] = None,
              bn_eps: Optional[float] = None) -> Callable[[int], nn.BatchNorm2d]:
    """The norm layer of every BatchNorm of a model: ``nn.BatchNorm2d`` with timm's
    ``bn_momentum``/``bn_eps`` where given (None keeps torch's 0.1 and 1e-5, as timm's
    ``resolve_bn_args``: a momentum of None would mean a cumulative average to torch)."""
    args = {k: v for k, v in (("momentum", bn_momentum), ("eps", bn_eps)) if v is not None}
    return partial(nn.BatchNorm2d, **args)


def drop_path_rates(drop_path_rate: float, blocks: int) -> List[float]:
    """Stochastic depth per block, timm's ResNet rule: 0 at the first block rising linearly to
    ``drop_path_rate`` at the last (``drop_path_rate * i / (blocks - 1)``)."""
    check_rate("drop_path_rate", drop_path_rate)
    return [drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]


def drop_path_layer(rate: float) -> nn.Module:
    """timm's ``DropPath`` for the residual branch of a block (nothing at rate 0: no module
    that changes outputs, parameters or random numbers)."""
    return DropPath(rate) if rate > 0 else nn.Identity()


class WRNBase(nn.Module):
    stage_names: tuple = ()

    def init_head(self, num_features: int, num_classes: int, global_pool: str,
                  in_chans: int, drop_rate: float = 0.0) -> None:
        check_rate("drop_rate", drop_rate)
        self.num_features = num_features
        self.num_classes, self.in_chans = num_classes, in_chans
        self.drop_rate = float(drop_rate)
        self.global_pool, self.fc = create_classifier(num_features, num_classes,
                                                      pool_type=global_pool)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        self.grad_checkpointing = False

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_post(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:  # timm's ResNet: dropout on the pooled features, pre_logits included
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's multi-scale API: the output of each ``feature_info`` level (all, the last
        ``indices`` if an int, or those listed), and the final feature map unless
        ``intermediates_only``. ``norm`` is accepted for timm's signature: the last level is
        always taken after the CIFAR nets' final BN-ReLU, as ``feature_info`` says."""
        assert output_fmt == "NCHW", "output shape must be NCHW"
        take, max_index = feature_take_indices(len(self.stage_names), indices)
        names = self.stage_names[:max_index + 1] if stop_early else self.stage_names
        x = self.forward_stem(x)
        intermediates = []
        for i, name in enumerate(names):
            stage = getattr(self, name)
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if i == len(self.stage_names) - 1:
                x = self.forward_post(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    @torch.jit.ignore
    def feature_maps(self, x: torch.Tensor) -> "dict[str, torch.Tensor]":
        """Every level's output keyed by its Detectron2 name (res2, res3, ...)."""
        outs = self.forward_intermediates(x, intermediates_only=True)
        return {info.name: out for info, out in zip(self.feature_info, outs)}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier (``num_classes=0``: none, ``forward`` returns pooled features;
        ``global_pool=''``: no pooling either), on the model's device and dtype."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes,
                                                      pool_type=global_pool,
                                                      **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1|^bn1|^maxpool",
                    blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")
