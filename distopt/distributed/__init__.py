"""distopt under FSDP2, HSDP, DDP and custom sharding.

DTensor parameters (``fully_shard``) are recognised automatically; plain tensors that
are row shards of a larger parameter are declared with :func:`shard_rows`. See
``docs/distributed.md`` for what is guaranteed.
"""

from .api import check_replicated, shard_rows
from .sharding import RowShard
from .state_dict import check_state_dict

__all__ = ["RowShard", "check_replicated", "check_state_dict", "shard_rows"]
