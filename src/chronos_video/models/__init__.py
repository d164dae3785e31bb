from .attention import ChronosAttention
from .mamba_chronos import ChronosMambaModel
from .transformer_nanosora import NanoSoraTransformer3DModel
from .wavelet_gate import WaveletGate

__all__ = ["ChronosAttention", "ChronosMambaModel", "NanoSoraTransformer3DModel", "WaveletGate"]
