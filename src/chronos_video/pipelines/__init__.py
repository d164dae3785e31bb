from .pipeline_flow_video import FlowVideoPipeline, VideoPipelineOutput
from .pipeline_nanosora import NanoSoraPipeline

__all__ = ["FlowVideoPipeline", "NanoSoraPipeline", "VideoPipelineOutput"]
