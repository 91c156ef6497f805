"""Run under torchrun by tests/test_precise_bn.py: precise BN on each rank's own batches.

Every rank builds the same seeded model and the same four batches, feeds the ones of its rank
(``batches[rank::world]``) and saves the statistics it ends with: first with plain BatchNorm, then with
the run's sync-BN conversion, whose batch statistics span all ranks' batches of a step.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from shufflenetv2 import create_model
from shufflenetv2.distributed import convert_sync_batchnorm
from shufflenetv2.precise_bn import recompute_batchnorm_statistics


def model_and_batches() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=3).eval()
    batches = [torch.randn(4, 3, 32, 32) * (1 + k) + k for k in range(4)]
    return model, batches


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = model_and_batches()
    for name, net in (("plain", copy.deepcopy(model)), ("sync", convert_sync_batchnorm(model, torch.device("cpu")))):
        fed = recompute_batchnorm_statistics([net], batches[rank::world])
        state = {k: v.contiguous() for k, v in net.state_dict().items() if "running" in k}
        save_file(state, str(Path(out) / f"{name}_rank{rank}.safetensors"), metadata={"fed": str(fed)})
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
