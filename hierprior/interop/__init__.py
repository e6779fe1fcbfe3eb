"""Adapters that turn other libraries' simulators into hierprior forward models.

- :func:`caustics_forward_model` (:mod:`hierprior.interop.caustics`): a caustics
  (https://github.com/Ciela-Institute/caustics) lensing simulator with a pixelated source as a
  per-observation :class:`~hierprior.physics.NonLinear` forward model, source image in, lensed
  image out, usable in :func:`~hierprior.posterior.sample_posterior` and
  :func:`~hierprior.em.run_em`.

The peer libraries are optional: they are imported when an adapter is called, never when this
package is imported.
"""

from hierprior.interop.caustics import CausticsForwardModel, caustics_forward_model

__all__ = ["CausticsForwardModel", "caustics_forward_model"]
