"""Constraint transport: region/keyframe constraints for flow-matching video samplers.

``ConstraintTransport.correct`` is called once per sampler step and returns a corrected velocity;
``ConstraintTransport.finalize`` projects the final sample into the constraint set and reports success.

* :mod:`.constraints`: :class:`RegionConstraint` (what must hold, in decoded pixels).
* :mod:`.metric`: the decoder's pullback metric ``G = JᵀJ + δI`` and its CG / Cholesky solves.
* :mod:`.cbf`: the control-barrier-function safety filter.
* :mod:`.transport`: :class:`ConstraintTransport`, which orchestrates them (natural gradient, DPS, RePaint).
* Latents -> pixels: :class:`chronos_video.decoding.LatentDecoder`, the decoder the pipelines return video with.
"""

from ..decoding import LatentDecoder
from .cbf import BarrierFilter, cbf_qp, cbf_safety_filter, finite_time_alpha
from .constraints import PixelDecoder, RegionConstraint, VAEDecoder, identity_pixel_decoder, vae_decoder
from .metric import CGResult, PullbackMetric, conjugate_gradient
from .transport import ConstraintTransport, ProjectionResult, StepInfo, StrengthSchedule

__all__ = [
    "BarrierFilter",
    "CGResult",
    "ConstraintTransport",
    "PixelDecoder",
    "ProjectionResult",
    "PullbackMetric",
    "RegionConstraint",
    "StepInfo",
    "StrengthSchedule",
    "VAEDecoder",
    "cbf_qp",
    "cbf_safety_filter",
    "conjugate_gradient",
    "finite_time_alpha",
    "LatentDecoder",
    "identity_pixel_decoder",
    "vae_decoder",
]
