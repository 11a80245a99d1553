"""The `vllm.general_plugins` entry point (pyproject.toml): makes the model runner reachable from the connector.

vLLM calls `register()` in every process it starts (front end, engine core, workers). A worker-side connector is
handed the KV cache tensors but not the model, and it needs the model to run rows through its decoder layers. So
`register()` wraps the model runners' `load_model`, which runs before the connector exists, and remembers each
runner whose model was loaded in this process; the connector asks `current_runner()`.
"""
from __future__ import annotations

import weakref

_RUNNERS: list = []


def current_runner():
    """The model runner whose `load_model` ran last in this process and is still alive, or None."""
    for ref in reversed(_RUNNERS):
        runner = ref()
        if runner is not None:
            return runner
    return None


def remember(runner) -> None:
    _RUNNERS.append(weakref.ref(runner))


def register() -> None:
    """Idempotent: vLLM may call it more than once per process."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # a vLLM without the V1 runner: nothing to wrap, the connector will say so
        return
    classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # it overrides load_model
        classes.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in classes:
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "_semshare_wrapped", False):
            continue

        def load_model(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            remember(self)
            return out

        load_model._semshare_wrapped = True
        load_model.__wrapped__ = original
        cls.load_model = load_model
