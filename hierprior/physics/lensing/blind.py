r"""Lensed observations whose lens nobody has modelled: the lens parameters are random variables.

:class:`BlindLensing` is the forward model of a population of strong lenses whose mass models
are unknown: the image of observation i is

.. math:: y_i = A(\eta_i)\, x_i + n_i, \qquad \eta_i \sim p(\eta),

with :math:`A(\eta)` the :class:`~hierprior.physics.lensing.Lensing` map of a lens with
parameters :math:`\eta` (a :class:`~hierprior.physics.lensing.ParametricMass`, e.g. SIE +
shear) and :math:`p(\eta)` a :class:`~hierprior.physics.lensing.LensPrior`. It holds the
geometry (image and source grids, supersampling, PSF), the family and its prior, and
optionally the true lens parameters of each observation (``truth``, (N, d): for simulation
and evaluation only; no posterior method reads them). Because the lens is unknown it has no
map of x alone: calling it (or its adjoint) is an error that says so, and the ordinary
posterior methods refuse it (the joint method, :mod:`hierprior.posterior.joint`, samples
:math:`(x, \eta)`). What it offers instead:

- :meth:`BlindLensing.at`: the ordinary (linear in x) :class:`~hierprior.physics.lensing.
  Lensing` at given parameters, (N, d) (one lens per observation) or (N, S, d) (one per
  observation and sample: a Lensing over N·S observations, observation-major);
- :meth:`BlindLensing.image`: the image at parameters (N, S, d) of sources (N, S, 1, n_s, n_s),
  differentiable in both (the lens-parameter MCMC's likelihood);
- :meth:`BlindLensing.truth_forward`: the Lensing at the true parameters (simulation,
  evaluation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.physics.forward import Compose, ForwardModel
from hierprior.physics.lensing.priors import LensPrior
from hierprior.physics.lensing.simulator import Lensing
from hierprior.physics.linear import Reshape

__all__ = ["BlindLensing"]


class BlindLensing(ForwardModel):
    """Lensed images of pixelated sources through unknown lenses (see the module docstring).

    Arguments:
        prior: the :class:`~hierprior.physics.lensing.LensPrior` of the lens parameters (its
            ``family`` is the mass model).
        image_size, pixel_scale, source_size, source_fov, supersample, psf: the geometry and
            PSF, as for :class:`~hierprior.physics.lensing.Lensing` (a per-observation PSF
            makes the model per observation).
        truth: the true lens parameters (N, d), or None (real data); evaluation and simulation
            only. Checked against the prior's support (one line naming the observation).
        flat: sources are vectors (n_s², ) (a prior over vectors, e.g. a
            :class:`~hierprior.diffusion.GaussianPrior`); :meth:`at` then returns
            ``Compose(Reshape((n_s²,), (1, n_s, n_s)), Lensing(...))``.

    Shapes: sources (N, [S,] 1, n_s, n_s) (flat: (N, [S,] n_s²)) -> images (N, [S,] 1, n, n)
    through :meth:`at` or :meth:`image`; ``num_obs`` = N from ``truth`` or the PSF, else None
    (shared).
    """

    linear = True  # in the source, at every lens
    #: the forward model's parameters are unknown: only joint (source, lens) methods apply
    blind = True

    def __init__(
        self,
        prior: LensPrior,
        image_size: int,
        pixel_scale: float,
        source_size: int,
        source_fov: float,
        supersample: int = 1,
        psf: float | Tensor | None = None,
        truth: Tensor | None = None,
        flat: bool = False,
    ):
        if not isinstance(prior, LensPrior):
            raise TypeError(f"prior must be a hierprior LensPrior; got {type(prior).__name__}")
        geometry = Lensing(
            None, image_size, pixel_scale, source_size, source_fov, supersample, psf
        )
        counts = {}
        if geometry.num_obs is not None:
            counts["psf"] = geometry.num_obs
        if truth is not None:
            if not isinstance(truth, Tensor) or truth.dim() != 2 or truth.shape[1] != prior.dim:
                raise ValueError(
                    f"truth must be a tensor (N, {prior.dim}) ({prior.names}); got "
                    f"{tuple(getattr(truth, 'shape', ()))}"
                )
            prior.check(truth)
            counts["truth"] = truth.shape[0]
        if len(set(counts.values())) > 1:
            raise ValueError(f"BlindLensing: the PSF and truth disagree on N: {counts}")
        num_obs = next(iter(counts.values())) if counts else None
        self.flat = bool(flat)
        inputs = (source_size * source_size,) if self.flat else geometry.input_shape
        super().__init__(inputs, geometry.output_shape, num_obs)
        self.prior = prior
        self.geometry = geometry
        self.register_buffer("truth", truth)

    @property
    def family(self):
        """The :class:`~hierprior.physics.lensing.ParametricMass` of the lenses."""
        return self.prior.family

    @property
    def names(self) -> tuple[str, ...]:
        """The lens parameters' names (the last axis of every parameter tensor)."""
        return self.prior.names

    # ------------------------------------------------------------------ lenses
    def _check_params(self, params: Tensor, shapes: str) -> Tensor:
        d = self.prior.dim
        if not isinstance(params, Tensor) or params.dim() not in (2, 3) or params.shape[-1] != d:
            raise ValueError(
                f"lens parameters must have shape {shapes} with d = {d} ({self.names}); got "
                f"{tuple(getattr(params, 'shape', ()))}"
            )
        if self.num_obs is not None and params.shape[0] != self.num_obs:
            raise ValueError(
                f"BlindLensing has {self.num_obs} observations; lens parameters have "
                f"{params.shape[0]}"
            )
        lines = self.family.outside_physical_range(params)
        if lines:
            S = params.shape[1] if params.dim() == 3 else 1
            first = lines[0].split(":", 1)
            row = int(first[0].split()[1])
            where = f"observation {row // S}" + (f", sample {row % S}" if S > 1 else "")
            raise ValueError(
                f"{where}:{first[1]}" + (f" ({len(lines)} rows)" if len(lines) > 1 else "")
            )
        return params

    def at(self, params: Tensor) -> ForwardModel:
        """The :class:`~hierprior.physics.lensing.Lensing` at lens parameters (N, d), or
        (N, S, d) (then N·S observations, observation-major, the PSF repeated S times); for
        flat sources composed after a Reshape. A lens outside the physical range is a one-line
        error naming the observation."""
        params = self._check_params(params, "(N, d) or (N, S, d)")
        g = self.geometry
        psf = None if g.blur is None else g.blur.psf
        if psf is not None and g.blur.num_obs is not None and params.dim() == 3:
            psf = psf.repeat_interleave(params.shape[1], dim=0)
        lens = Lensing(
            self.family.fixed(params),
            g.image_size,
            g.pixel_scale,
            g.source_size,
            g.source_fov,
            g.supersample,
            psf,
        )
        return Compose(Reshape(self.input_shape, g.input_shape), lens) if self.flat else lens

    def rays(self, params: Tensor, dtype=None, device=None) -> Tensor:
        """grid_sample coordinates (β / (F_s/2)) of the ray grid for lens parameters
        (\\*lead, d): (prod(lead), m, m, 2), differentiable in params."""
        g = self.geometry
        dtype = params.dtype if dtype is None else dtype
        c = g.image_grid(g.supersample, dtype, params.device if device is None else device)[0][0]
        ax, ay = self.family.grid_deflection(params.to(dtype), c, c)
        lead = params.shape[:-1]
        half = g.source_fov / 2
        bx = c.reshape(*([1] * len(lead)), 1, -1) - ax
        by = c.reshape(*([1] * len(lead)), -1, 1) - ay
        grid = torch.stack((bx / half, by / half), dim=-1)
        return grid.reshape(-1, *grid.shape[-3:])

    def image(self, params: Tensor, x: Tensor) -> Tensor:
        """The images (N, S, 1, n, n) of sources x (N, S, 1, n_s, n_s) through the lenses
        params (N, S, d), one per (observation, sample); differentiable in params and x (no
        cache: this is the lens-parameter likelihood's path; no range check either, the
        caller keeps params inside the prior)."""
        k = len(self.input_shape)
        if params.dim() != 3 or x.dim() != 2 + k or x.shape[:2] != params.shape[:2]:
            raise ValueError(
                f"image needs params (N, S, d) and sources (N, S, *{self.input_shape}) with the "
                f"same (N, S); got {tuple(params.shape)} and {tuple(x.shape)}"
            )
        if tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"sources must end with {self.input_shape}; got {tuple(x.shape)}")
        x = x.reshape(*x.shape[:2], *self.geometry.input_shape)
        return self.geometry.render(x, self.rays(params, x.dtype))

    def truth_forward(self) -> ForwardModel:
        """The Lensing at the true lens parameters (simulation and evaluation only)."""
        if self.truth is None:
            raise ValueError("this BlindLensing holds no true lens parameters (truth=None)")
        return self.at(self.truth)

    def reference(self) -> ForwardModel:
        """A Lensing at the prior's median lens (shape checks), per observation when the model
        is."""
        median = self.prior.median(dtype=torch.float64)
        return self.at(median.expand(self.num_obs or 1, -1))

    # ------------------------------------------------------------------ the (absent) map
    def _refuse(self) -> None:
        raise ValueError(
            "BlindLensing: the lens of each observation is unknown (its parameters are random "
            "variables); evaluate the image at lens parameters with .at(params) or .image(...), "
            "and sample (source, lens) with the joint posterior method"
        )

    def _forward(self, x: Tensor) -> Tensor:
        self._refuse()

    def _adjoint(self, y: Tensor) -> Tensor:
        self._refuse()

    def _select(self, index: Tensor) -> BlindLensing:
        g = self.geometry
        psf = None if g.blur is None else g.blur.psf
        if psf is not None and g.blur.num_obs is not None:
            psf = psf.index_select(0, index.to(psf.device))
        truth = (
            None if self.truth is None else self.truth.index_select(0, index.to(self.truth.device))
        )
        return BlindLensing(
            self.prior,
            g.image_size,
            g.pixel_scale,
            g.source_size,
            g.source_fov,
            g.supersample,
            psf,
            truth,
            self.flat,
        )

    def extra_repr(self) -> str:
        flat = ", flat=True" if self.flat else ""
        g = self.geometry
        return (
            f"{self.family}, names={self.names}{flat}, image_size={g.image_size}, "
            f"pixel_scale={g.pixel_scale}, source_size={g.source_size}, "
            f"source_fov={g.source_fov}, supersample={g.supersample}, num_obs={self.num_obs}"
        )
