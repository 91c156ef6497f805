"""ShuffleNetV2 on PyTorch, numerically faithful to MindCV, with weights that move between MindCV,
torchvision and safetensors."""

from .deploy import export_onnx, export_program, fuse
from .errors import CheckpointError, DownloadError, ShuffleNetV2Error
from .factory import create_model
from .host_memory import keep_freed_memory
from .layout import convert_layout
from .model import WIDTHS, ShuffleNetV2, ShuffleNetV2Torchvision, build_network
from .onnx_graph import fuse_for_onnx
from .package import compile_package, load_package
from .summary import summarize
from .weights import Weights, detect_format, load_weights, read_weights, save_weights

MODEL_NAMES = tuple(WIDTHS)

__all__ = [
    "MODEL_NAMES",
    "CheckpointError",
    "DownloadError",
    "ShuffleNetV2",
    "ShuffleNetV2Error",
    "ShuffleNetV2Torchvision",
    "Weights",
    "build_network",
    "compile_package",
    "convert_layout",
    "create_model",
    "detect_format",
    "export_onnx",
    "export_program",
    "fuse",
    "fuse_for_onnx",
    "keep_freed_memory",
    "load_package",
    "load_weights",
    "read_weights",
    "save_weights",
    "summarize",
]
__version__ = "0.1.0"
