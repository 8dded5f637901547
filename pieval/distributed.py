"""How pieval's processes find each other on CPU: accelerate's gloo group, and what accelerate will not do there.

accelerate forms a CPU process group only when told to (``ACCELERATE_USE_CPU=1``, which
``accelerate launch --cpu`` sets); under a plain ``torchrun`` on a machine without an accelerator
every process would otherwise run alone as if it were the only one. Both the lm-eval backend
(``pi_llama``) and ``pieval finetune`` take their rank and world size from that group.
"""

from __future__ import annotations

import os

from pieval.errors import UserError


def several_cpu_processes() -> bool:
    """Launched as several processes (torchrun, accelerate launch) on a machine without an accelerator."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def use_cpu_group() -> bool:
    """Whether accelerate should form its CPU (gloo) group: asked for, or the only one there can be."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or several_cpu_processes()


def refuse_ignored_fsdp(accelerator) -> None:
    """A UserError when the accelerate config asks for FSDP and accelerate did not turn it on.

    accelerate (1.16) enables FSDP, version 1 or 2, only for GPU-like process groups
    (``AcceleratorState``: MULTI_GPU, MULTI_NPU, MULTI_XPU, ...); on a CPU (gloo) group it keeps
    ``MULTI_CPU`` and wraps the model in DDP without a word, so a run meant to shard would hold
    the whole model in every process. torch itself runs FSDP2's ``fully_shard`` on gloo.
    """
    import accelerate
    from accelerate.utils import DistributedType, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_FSDP") or accelerator.distributed_type == DistributedType.FSDP:
        return
    raise UserError(
        f"the accelerate config asks for FSDP (fsdp_version {os.environ.get('FSDP_VERSION', '1')}), but accelerate "
        f"{accelerate.__version__} enables FSDP only on GPUs and other accelerators: on {accelerator.device.type} it "
        f"would run as {accelerator.distributed_type.value}, every process holding the whole model. On CPU launch "
        "without the FSDP config (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m pieval finetune ...`: DDP)"
    )
