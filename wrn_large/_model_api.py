"""What every registry WRN offers beyond ``forward``: timm's model interface (``num_features``,
``forward_features`` -> the last feature map, ``forward_head(x, pre_logits)``,
``get_classifier``/``reset_classifier``, ``forward_intermediates``, activation checkpointing,
``group_matcher``), written once for both families.

A family builds its stem, ``stage_names`` (its stages, in order), ``forward_post`` (the CIFAR
nets' final BN-ReLU; nothing on ImageNet) and ``feature_info`` (one entry per stage), then
calls ``init_head``. Its ``forward_features`` is written out (TorchScript compiles it): stem,
stages (through timm's ``checkpoint_seq`` when ``set_grad_checkpointing`` is on: activations
are re-computed in backward, the gradients are the same), ``forward_post``."""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.layers.helpers import get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq


class WRNBase(nn.Module):
    stage_names: tuple = ()

    def init_head(self, num_features: int, num_classes: int, global_pool: str,
                  in_chans: int) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.num_classes, self.in_chans = num_classes, in_chans
        self.global_pool, self.fc = create_classifier(num_features, num_classes,
                                                      pool_type=global_pool)
        self.grad_checkpointing = False

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_post(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
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
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1|^bn1|^maxpool",
                    blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")
