"""Constraint transport: region/keyframe constraints for flow-matching video samplers.

``ConstraintTransport.correct`` is called once per sampler step and returns a corrected velocity;
``ConstraintTransport.finalize`` projects the final sample into the constraint set and reports success.
"""

from .constraints import (
    PixelDecoder,
    RegionConstraint,
    VAEDecoder,
    identity_pixel_decoder,
    vae_decoder,
)
from .transport import (
    CGResult,
    ConstraintTransport,
    ProjectionResult,
    PullbackMetric,
    StepInfo,
    StrengthSchedule,
    cbf_qp,
    cbf_safety_filter,
    conjugate_gradient,
    finite_time_alpha,
)

__all__ = [
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
    "identity_pixel_decoder",
    "vae_decoder",
]
