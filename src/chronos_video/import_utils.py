"""Lazy top-level exports and a quiet first import of the diffusers / transformers stack.

`import chronos_video` must stay cheap: the CLI answers `--help` without torch, and diffusers only
needs the component classes when it resolves a `model_index.json`. The first real import of our
models or pipelines loads diffusers' `ModelMixin` and transformers' `PreTrainedModel`; those import
the optional quantisation backends on their own (diffusers.quantizers and transformers.quantizers
import torchao, diffusers.hooks imports peft, which imports bitsandbytes). Where those backends
cannot use their compiled kernels (a CPU-only torch, a torchao wheel built for another Python or
torch, bitsandbytes without the optional `kernels` package) they log warnings at import time that
say nothing about chronos-video and cannot be turned off by an environment variable.
`quiet_backend_imports` raises exactly those loggers to ERROR for the duration of our import and
restores them afterwards, so later use of torchao or bitsandbytes logs as usual.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Loggers whose import-time warnings are about optional kernels of backends we do not call at import.
BACKEND_IMPORT_LOGGERS: tuple[str, ...] = (
    "torchao",  # "Failed to load .../torchao/_C*.so"
    "torch.utils._pytree",  # torchao registering Enums as pytree constants, deprecated in torch >= 2.10
    "bitsandbytes",  # "Failed to load CPU gemm_4bit_forward from kernels-community"
    "diffusers.quantizers.torchao",  # "Unable to import `torchao` Tensor objects"
)


@contextmanager
def quiet_backend_imports(names: tuple[str, ...] = BACKEND_IMPORT_LOGGERS) -> Iterator[None]:
    """Raises the given loggers to ERROR inside the block; restores their levels afterwards."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def lazy_export(package: str, exports: dict[str, str], namespace: dict[str, Any], name: str) -> Any:
    """Module `__getattr__` body (PEP 562): imports `name` from its submodule on first access and
    caches it in the package namespace, so later lookups are plain attribute reads."""
    submodule = exports.get(name)
    if submodule is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    with quiet_backend_imports():
        value = getattr(importlib.import_module(submodule, package), name)
    namespace[name] = value
    return value
