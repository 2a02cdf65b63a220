"""``python fsdp_on_cpu.py ARGS`` = ``vlsi ARGS`` with FSDP honoured on CPU processes (tests only).

accelerate 1.x turns FSDP on only for accelerator devices: on CPU processes
(``DistributedType.MULTI_CPU``) the Trainer's FSDP plugin is dropped and the run is plain DDP.
torch's FSDP2 itself runs on the CPU with gloo, so this launcher target lets accelerate keep
the plugin the Trainer passed, and the whole FSDP2 path of the Trainer (``fsdp2_prepare_model``,
sharded checkpoints, full state dicts on save) runs as on GPUs. Nothing else is changed; on
GPUs no such shim is needed. Run it under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_accelerator_state_init = state.AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _keep_fsdp_on_cpu
    sys.argv = ["vlsi", *sys.argv[1:]]
    runpy.run_module("vlsi.cli", run_name="__main__")
