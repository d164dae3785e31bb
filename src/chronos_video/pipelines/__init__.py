from .pipeline_ar import ARVideoPipeline
from .pipeline_chronos import ChronosPipeline
from .pipeline_flow_video import FlowVideoPipeline, VideoPipelineOutput
from .pipeline_hrm import HRMVideoPipeline
from .pipeline_nanosora import NanoSoraPipeline

__all__ = ["ARVideoPipeline", "ChronosPipeline", "FlowVideoPipeline", "HRMVideoPipeline", "NanoSoraPipeline", "VideoPipelineOutput"]
