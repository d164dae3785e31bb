from .attention import ChronosAttention
from .hrm_video import HRMVideoModel
from .mamba_chronos import ChronosMambaModel
from .transformer_nanosora import NanoSoraTransformer3DModel
from .wavelet_gate import WaveletGate

__all__ = ["ChronosAttention", "ChronosMambaModel", "HRMVideoModel", "NanoSoraTransformer3DModel", "WaveletGate"]
