"""Parallel layouts beyond DDP: FSDP2 / HSDP, tensor and sequence parallelism, pipeline parallelism, sharded (DCP)
checkpoints, memory planning and the DeepSpeed ZeRO-3 backend.

`parallel.layout` resolves and checks the layout, `parallel.apply` applies it to the model in one fixed order,
`parallel.executor` runs a step under it, `parallel.checkpoint` saves and reshards. The model file itself holds no
parallel code.
"""

from .layout import Layout, resolve_layout, split_layers

__all__ = ["Layout", "resolve_layout", "split_layers"]
