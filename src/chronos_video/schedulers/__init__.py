from .scheduling_chronos_flow_match import ChronosFlowMatchScheduler, current_sigmas

__all__ = ["ChronosFlowMatchScheduler", "current_sigmas"]
