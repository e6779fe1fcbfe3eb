"""The shared part of hierprior's image classifiers (digits, galaxy morphology): input checks and
batched, gradient-free class probabilities.

A subclass sets ``resolution`` and ``num_classes`` and defines ``forward`` (logits, with shape
(B, num_classes), of images (B, 1, R, R)) with a ``head`` whose second layer holds its
weights' dtype and device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """Base class of CNN classifiers of (B, 1, R, R) images into ``num_classes`` classes."""

    resolution: int
    num_classes: int

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor of images, got {type(x).__name__}")
        R = self.resolution
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (R, R):
            raise ValueError(f"expected images with shape (B, 1, {R}, {R}), got {tuple(x.shape)}")

    @torch.no_grad()
    def predict_proba(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """Class probabilities p(k | x), with shape (B, num_classes), in eval mode and without
        gradients.

        Arguments:
            images: Images in ``value_range``, with shape (B, 1, R, R), on any device.
            batch_size: Images per forward pass.
        """

        self._check(images)
        was_training = self.training
        self.eval()
        device = self.head[1].weight.device
        try:
            out = [F.softmax(self(chunk.to(device)), dim=-1) for chunk in images.split(batch_size)]
        finally:
            self.train(was_training)
        if not out:
            return torch.empty(0, self.num_classes, device=device)
        return torch.cat(out)

    def classify(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """The most probable class of each image, int64 with shape (B,).

        Arguments:
            images: Images in ``value_range``, with shape (B, 1, R, R).
            batch_size: Images per forward pass.
        """

        return self.predict_proba(images, batch_size).argmax(dim=-1)
