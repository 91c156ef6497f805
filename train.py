"""MindCV's train.py on PyTorch.

python train.py --config configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml --data_dir DIR [--distribute False]
torchrun --nproc_per_node 8 train.py --config ... --data_dir DIR      # distributed (msrun's analogue)
"""

import sys

from shufflenetv2.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
