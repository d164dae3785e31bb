from .attention import ChronosAttention
from .mamba_chronos import ChronosMambaModel
from .transformer_nanosora import NanoSoraTransformer3DModel

__all__ = ["ChronosAttention", "ChronosMambaModel", "NanoSoraTransformer3DModel"]
