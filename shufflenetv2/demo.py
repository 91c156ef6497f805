"""A self-contained tour of the weight interchange, runnable offline with nothing but this package.

``shufflenetv2 demo`` (the README's main job is ``make demo``, which trains): it builds shufflenet_v2_x0_5
with MindCV's initialisation, writes it as a MindCV ``.ckpt``, converts it to our safetensors and to the
torchvision layout, loads torchvision's own network's weights, and shows that every route gives the
same logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .factory import create_model
from .model import build_network
from .summary import format_summary, summarize
from .weights import read_weights, save_weights

NAME = "shufflenet_v2_x0_5"


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def run_demo(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    model = build_network(NAME, num_classes=10)
    for module in model.modules():  # give BN non-trivial statistics so every tensor matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    print(format_summary(summarize(model), f"{NAME} (MindCV layout, 10 classes)", layers=False))
    x = torch.randn(4, 3, 224, 224)
    rows = []

    ckpt = save_weights(out / f"{NAME}.ckpt", model)
    from_ckpt = create_model(NAME, num_classes=10, checkpoint_path=ckpt)
    rows.append(("MindCV .ckpt written and read back", ckpt, _max_diff(model, from_ckpt, x)))

    ours = save_weights(out / f"{NAME}.safetensors", from_ckpt, source=ckpt.name)
    rows.append(("safetensors", ours, _max_diff(model, create_model(NAME, 10, checkpoint_path=ours), x)))

    tv_model = create_model(NAME, num_classes=10, checkpoint_path=ckpt, layout="torchvision")
    tv_file = save_weights(out / f"{NAME}_torchvision_layout.safetensors", tv_model, source=ckpt.name)
    back = create_model(NAME, num_classes=10, checkpoint_path=tv_file, layout="torchvision")
    rows.append(("converted to the torchvision layout", tv_file, _max_diff(model, back, x)))

    again = create_model(NAME, num_classes=10, checkpoint_path=tv_file)  # and back to MindCV's layout
    rows.append(("torchvision layout back to MindCV's", tv_file, _max_diff(model, again, x)))

    import torchvision

    reference = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    tv_pth = out / "torchvision_shufflenet_v2_x0_5.pth"
    torch.save(reference.state_dict(), tv_pth)
    ported = create_model(NAME, num_classes=10, checkpoint_path=tv_pth, layout="torchvision")
    rows.append(("torchvision's own model, state dict loaded", tv_pth, _max_diff(reference, ported, x)))

    print("\nSame logits through every route (max |difference| on 4 random 224x224 images):")
    for what, path, diff in rows:
        print(f"  {what:<44} {diff:9.2e}   {path}")
    info = read_weights(ckpt)
    print(
        f"\n{ckpt} holds {len(info.tensors)} tensors; "
        f"inferred: {info.arch['model']}, {info.arch['num_classes']} classes"
    )
    worst = max(diff for _, _, diff in rows)
    print(f"worst difference {worst:.2e}: {'OK' if worst < 1e-4 else 'MISMATCH'}")
    if worst >= 1e-4:
        raise SystemExit(1)


def main() -> None:
    run_demo(Path("runs/demo"))


if __name__ == "__main__":
    main()
