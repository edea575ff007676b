"""distopt under FSDP2, HSDP, DDP and custom sharding.

DTensor parameters (``fully_shard``) are recognised automatically; plain tensors that
are row shards of a larger parameter are declared with :func:`shard_rows`. See
``docs/distributed.md`` for what is guaranteed.
"""

from .collectives import max_values, sum_rows
from .sharding import RowShard, describe_dtensor, local

__all__ = ["RowShard", "describe_dtensor", "local", "max_values", "sum_rows"]
