"""Parameter counts of every model in `gp_loss.surrogate.models.MODELS` for a few input shapes.

Fed by: the package only (models are built on the CPU, nothing is trained or downloaded).
Prints one line per model and shape, then a JSON object as its last line (DESIGN §8 convention):
trainable parameters and BatchNorm running statistics (Keras `count_params()` counts both, which
is how the paper's ResNet9V2 figure of 30,666 arises).

    python analysis/count_params.py
"""
from __future__ import annotations

import json

from gp_loss.surrogate.models import MODELS, build_model

SHAPES = [("grey28x10", 1, 10, 28), ("colour32x10", 3, 10, 32), ("colour32x100", 3, 100, 32)]


def counts(name: str, c: int, k: int, s: int) -> dict:
    m = build_model(name, c, k, s)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in m.named_buffers()
                if n.endswith(("running_mean", "running_var")))
    return {"trainable": trainable, "bn_stats": stats, "keras_count": trainable + stats}


def main() -> None:
    out: dict = {}
    for name in MODELS:
        out[name] = {}
        for label, c, k, s in SHAPES:
            out[name][label] = r = counts(name, c, k, s)
            print(f"{name:20s} {label:13s} trainable {r['trainable']:>11,}  "
                  f"+ BN stats {r['bn_stats']:>7,} = {r['keras_count']:>11,}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
