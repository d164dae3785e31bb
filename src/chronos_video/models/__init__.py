from .attention import ChronosAttention
from .transformer_nanosora import NanoSoraTransformer3DModel

__all__ = ["ChronosAttention", "NanoSoraTransformer3DModel"]
