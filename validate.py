"""MindCV's validate.py on PyTorch.

python validate.py -c configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml --data_dir DIR --ckpt_path CKPT
"""

import sys

from shufflenetv2.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
