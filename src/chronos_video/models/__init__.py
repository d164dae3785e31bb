from .ar_video import ARVideoConfig, ARVideoForCausalLM, VisualTokensLogitsProcessor
from .attention import ChronosAttention
from .fsq_tokenizer import FSQVideoTokenizer
from .hrm_video import HRMVideoModel
from .mamba_chronos import ChronosMambaModel
from .transformer_nanosora import NanoSoraTransformer3DModel
from .wavelet_gate import WaveletGate

__all__ = [
    "ARVideoConfig",
    "ARVideoForCausalLM",
    "ChronosAttention",
    "ChronosMambaModel",
    "FSQVideoTokenizer",
    "HRMVideoModel",
    "NanoSoraTransformer3DModel",
    "VisualTokensLogitsProcessor",
    "WaveletGate",
]
