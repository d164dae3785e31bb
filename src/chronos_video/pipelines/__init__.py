from .pipeline_chronos import ChronosPipeline
from .pipeline_flow_video import FlowVideoPipeline, VideoPipelineOutput
from .pipeline_hrm import HRMVideoPipeline
from .pipeline_nanosora import NanoSoraPipeline

__all__ = ["ChronosPipeline", "FlowVideoPipeline", "HRMVideoPipeline", "NanoSoraPipeline", "VideoPipelineOutput"]
