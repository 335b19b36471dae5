"""``python tests/sharded_on_cpu.py FLAGS``: ``quietstar train`` under accelerate's FSDP or DeepSpeed
path in CPU processes (gloo), for tests/test_distributed.py; start it with ``accelerate launch``.

accelerate decides the distributed type once, in AcceleratorState, and turns a FSDP or DeepSpeed
plugin into FSDP / DEEPSPEED only on accelerators: CPU processes stay MULTI_CPU (plain DDP), so
``accelerate launch --config_file examples/fsdp.yaml`` on CPUs never shards anything. This
launcher makes that one decision as it would be made on GPUs; everything after it (preparing the
model, sharded collectives over gloo, checkpoints) is accelerate's and quietstar's own code.
"""

from __future__ import annotations

import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _init_sharded(self, mixed_precision=None, cpu=False, *args, fsdp_plugin=None, deepspeed_plugin=None,
                  **kwargs):
    _init(self, mixed_precision, cpu, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin,
          **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:  # what AcceleratorState does for GPUs
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:
        self.distributed_type = DistributedType.DEEPSPEED
        self._mixed_precision = "no"  # DeepSpeed's own config holds the precision
        deepspeed_plugin.set_mixed_precision(mixed_precision or "no")
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
    else:
        return
    accelerate.state.PartialState._shared_state["distributed_type"] = self.distributed_type


accelerate.state.AcceleratorState.__init__ = _init_sharded

if __name__ == "__main__":
    from quietstar.cli.train import main

    sys.exit(main(sys.argv[1:]))
