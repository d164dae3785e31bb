from .scheduling_chronos_flow_match import ChronosFlowMatchScheduler

__all__ = ["ChronosFlowMatchScheduler"]
