"""nasq: search how many bits each part of a BERT deserves, prune the rest, ship a small integer model.

The Python API (``nasq.api``) is re-exported here lazily, so ``import nasq`` stays light (no JAX until used)::

    import nasq
    model = nasq.load("runs/model.nasq")
    model.predict(["a gripping, funny film"])
"""

from nasq._version import __version__
from nasq.allocator import tune_allocator

tune_allocator()  # keep freed memory in the process: XLA on CPU allocates every call's buffers afresh

_API = ("Model", "allocate", "evaluate", "export_artifact", "export_onnx", "finalize", "finetune", "inspect", "load",
        "make_config", "run_search")
__all__ = ["Model", "__version__", "allocate", "enable_compilation_cache", "evaluate", "export_artifact", "export_onnx",
           "finalize", "finetune", "inspect", "load", "make_config", "run_search"]


def __getattr__(name: str):
    if name == "enable_compilation_cache":  # opt-in for library users (the CLI turns it on)
        from nasq.compilation_cache import enable_compilation_cache

        return enable_compilation_cache
    if name in _API:
        from nasq import api

        return getattr(api, name)
    raise AttributeError(f"module 'nasq' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
