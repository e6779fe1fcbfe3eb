r"""Lightning training of a diffusion prior by denoising score matching, with EMA weights.

:class:`PriorModule` wraps an :class:`~hierprior.diffusion.EDMDenoiser` :math:`D_\theta` and
minimises the EDM-weighted denoising score-matching loss
(:func:`~hierprior.diffusion.dsm_loss`)

.. math::
    L(\theta) = E_{x, t, \varepsilon}\, \lambda(s_t)\,
    \| D_\theta(\alpha_t x + \sigma_t \varepsilon, t) - x \|^2 / \dim x

with AdamW, a linear learning-rate warm-up :math:`\eta_k = \eta \min(1, (k + 1) / K_w)` over the
first :math:`K_w` optimiser steps, and gradient clipping (the trainer's ``gradient_clip_val``).

After every optimiser step an exponential moving average of the weights is updated,

.. math::
    \bar\theta \leftarrow \beta_n \bar\theta + (1 - \beta_n) \theta, \qquad
    \beta_n = \min\big(\beta, \tfrac{1 + n}{10 + n}\big),

where n counts the EMA updates so far; the warm-up of :math:`\beta_n` forgets the random
initialisation quickly. The EMA denoiser is the one sampled from and saved as the prior.
When the EMA is warm-started from a previous prior (``ema_state_dict``, the EM M-step), the
warm-up is skipped by default, since the average no longer starts from a random network.

References:
    Karras et al. (2022), Elucidating the Design Space of Diffusion Models, arXiv 2206.00364.
    Song & Ermon (2020), Improved Techniques for Training Score-Based Generative Models,
    arXiv 2006.09011 (EMA of the weights).
    Loshchilov & Hutter (2019), Decoupled Weight Decay Regularization, arXiv 1711.05101.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from hierprior.checks import check_choice, check_float, check_int, check_positive
from hierprior.diffusion.denoiser import Denoiser, dsm_loss

__all__ = [
    "PriorModule",
    "TIME_DISTRIBUTIONS",
    "TRAINER_VOCABULARY",
    "check_betas",
    "ema_decay_at",
    "update_ema",
]

#: the optimiser settings that the round-0 prior's training (the ``train`` config section) and
#: the EM M-step (:class:`~hierprior.em.NetworkMStep`, ``em.mstep``) share, by one name
TRAINER_VOCABULARY = (
    "lr",
    "weight_decay",
    "betas",
    "warmup_steps",
    "ema_decay",
    "gradient_clip_val",
    "checkpoint_every",
    "time_distribution",
)

#: training-time distributions of :func:`~hierprior.diffusion.dsm_loss`
TIME_DISTRIBUTIONS = ("lognormal", "uniform")


def check_betas(betas: object) -> tuple[float, float]:
    """AdamW's (beta_1, beta_2): two numbers in [0, 1), as a tuple of floats."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return tuple(
        check_float(b, f"betas[{i}]", 0.0, maximum=1.0, strict_maximum=True)
        for i, b in enumerate(betas)
    )


def ema_decay_at(decay: float, n: int, warmup: bool = True) -> float:
    """The EMA decay for the update that follows n earlier updates: min(decay, (1+n)/(10+n))."""
    if not warmup:
        return float(decay)
    return min(float(decay), (1.0 + n) / (10.0 + n))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ema_param <- decay * ema_param + (1 - decay) * param; buffers are copied.

    ``ema`` and ``model`` must have the same architecture (a deep copy, say).
    """
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
    if any(e.dtype != p.dtype or e.device != p.device for e, p in pairs):
        for e, p in pairs:
            e.lerp_(p.to(e), 1.0 - decay)
    elif pairs:
        # one fused kernel per group of tensors instead of one per parameter (GPU)
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, buf in model.named_buffers():
        ema_buffers[name].copy_(buf)


#: training-time augmentations of :class:`PriorModule`
AUGMENTATIONS = (None, "dihedral")


def dihedral(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of x (B, C, H, W), H = W, under a random element of the dihedral group D4
    (k quarter turns, then a left-right flip with probability 1/2), drawn from ``generator``."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"dihedral augmentation needs square images (B, C, H, H), got {tuple(x.shape)}"
        )
    g = torch.randint(0, 8, (len(x),), generator=generator, device=generator.device).to(x.device)
    out = torch.empty_like(x)
    for element in range(8):
        idx = (g == element).nonzero().flatten()
        if len(idx):
            y = torch.rot90(x[idx], element % 4, dims=(-2, -1))
            out[idx] = torch.flip(y, dims=(-1,)) if element >= 4 else y
    return out


class PriorModule(pl.LightningModule):
    """Trains a diffusion prior by denoising score matching and keeps an EMA of its weights.

    Batches are tensors with shape (B, *event_shape), or tuples/lists whose first element is.

    Arguments:
        denoiser: the denoiser to train (its weights are the raw, optimised ones).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: optimiser steps of the linear learning-rate warm-up (0: none).
        ema_decay: decay beta in [0, 1) of the EMA of the weights.
        time_distribution: training-time distribution of ``dsm_loss``, ``"lognormal"`` (EDM)
            or ``"uniform"``.
        ema_state_dict: optional state dict of the EMA denoiser to start from (e.g. the
            previous EM round's prior); the raw weights always come from ``denoiser`` and the
            optimiser always starts afresh.
        betas: AdamW's (beta_1, beta_2).
        ema_warmup: apply the decay warm-up min(decay, (1+n)/(10+n)); default: True unless
            ``ema_state_dict`` is given.
        seed: seed of the module's own generators for the training noise and times (the
            global RNG is never used for them).
        augment: ``None`` or ``"dihedral"``: each training image (B, C, H, W), H = W, is
            replaced by a random element of the dihedral group D4 (rotations by multiples of
            90 degrees, with or without a flip), drawn from the module's generator. For
            populations whose statistics do not change under rotations and reflections
            (galaxies at random position angles and winding senses; isotropic fields), the
            prior should not either: it is the maximum-likelihood fit within the invariant
            family, an eightfold larger training set at no cost.

    Example:
        >>> from hierprior.nn import MLP
        >>> from hierprior.diffusion import EDMDenoiser
        >>> module = PriorModule(EDMDenoiser(MLP(2), (2,)), lr=1e-3, warmup_steps=10)
        >>> prior = module.sampling_prior()  # the EMA denoiser, in eval mode

    References:
        Karras et al. (2022), EDM, arXiv 2206.00364.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        ema_decay: float = 0.999,
        time_distribution: str = "lognormal",
        ema_state_dict: Mapping[str, Tensor] | None = None,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        ema_warmup: bool | None = None,
        seed: int = 0,
        augment: str | None = None,
    ):
        super().__init__()
        if not isinstance(denoiser, Denoiser):
            raise TypeError(
                f"denoiser must be a hierprior Denoiser, got {type(denoiser).__name__}"
            )
        check_positive(lr, "lr")
        check_float(weight_decay, "weight_decay")
        check_int(warmup_steps, "warmup_steps", 0)
        check_float(ema_decay, "ema_decay", 0.0, maximum=1.0, strict_maximum=True)
        check_choice(time_distribution, "time_distribution", TIME_DISTRIBUTIONS)
        if augment is not None:
            check_choice(augment, "augment", AUGMENTATIONS[1:])
        betas = check_betas(betas)
        self.save_hyperparameters(ignore=["denoiser", "ema_state_dict"])
        self.hparams["betas"] = list(betas)

        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser)
        if ema_state_dict is not None:
            try:
                self.ema.load_state_dict(dict(ema_state_dict))
            except RuntimeError as err:
                raise ValueError(f"ema_state_dict does not fit the denoiser: {err}") from err
        self.ema.requires_grad_(False)
        self.ema.eval()
        self.ema_warmup = ema_state_dict is None if ema_warmup is None else bool(ema_warmup)
        # EMA updates so far (saved in Lightning checkpoints, restored on resume)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_n: int | None = None
        self._train_generator: torch.Generator | None = None
        self._train_generator_state: Tensor | None = None
        self._val_generator: torch.Generator | None = None

    # ----------------------------------------------------------------- modes and accessors
    def train(self, mode: bool = True) -> PriorModule:
        super().train(mode)
        self.ema.eval()  # the EMA never trains; it is only sampled from
        return self

    def sampling_prior(self) -> Denoiser:
        """The EMA denoiser in eval mode (the one to sample from and to save as the prior)."""
        return self.ema.eval()

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """The raw (non-EMA) denoiser D(x_t, t); x_t with shape (B, *event_shape)."""
        return self.denoiser(x_t, t)

    # ----------------------------------------------------------------------- generators
    def _generator(self) -> torch.Generator:
        device = self.device
        gen = self._train_generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device).manual_seed(int(self.hparams.seed))
            if self._train_generator_state is not None:
                gen.set_state(self._train_generator_state)
                self._train_generator_state = None
            self._train_generator = gen
        return gen

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._train_generator is not None:
            checkpoint["hierprior_train_generator"] = self._train_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_n = None  # re-read from the restored buffer
        state = checkpoint.get("hierprior_train_generator")
        if state is not None:
            self._train_generator = None
            self._train_generator_state = state.cpu()

    # -------------------------------------------------------------------------- training
    @staticmethod
    def _batch(batch) -> Tensor:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"a batch must be a tensor or a tuple of tensors, got {type(batch)}")
        return batch

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x = self._batch(batch)
        if self.hparams.get("augment") == "dihedral":
            x = dihedral(x, self._generator())
        loss = dsm_loss(
            self.denoiser,
            x,
            generator=self._generator(),
            time_distribution=self.hparams.time_distribution,
        )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        # a host-side copy of the counter (read once, after any checkpoint was restored), so
        # that the EMA update needs no device synchronisation
        self._ema_n = int(self.ema_updates)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # exactly one EMA update per optimiser step
        if self._ema_n is None:
            self._ema_n = int(self.ema_updates)
        decay = ema_decay_at(self.hparams.ema_decay, self._ema_n, self.ema_warmup)
        update_ema(self.ema, self.denoiser, decay)
        self._ema_n += 1
        self.ema_updates += 1

    def on_validation_epoch_start(self) -> None:
        # the same noise and times at every validation, so val/loss curves are comparable
        self._val_generator = torch.Generator(device=self.device).manual_seed(12345)

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        if self._val_generator is None:
            self.on_validation_epoch_start()
        x = self._batch(batch)
        loss = dsm_loss(
            self.denoiser,
            x,
            generator=self._val_generator,
            time_distribution=self.hparams.time_distribution,
        )
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.denoiser.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        warmup = int(self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: 1.0 if warmup == 0 else min(1.0, (k + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
