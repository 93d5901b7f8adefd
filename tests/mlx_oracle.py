"""mlx-lm as the oracle, run in its own interpreter (mlx and torch never share a process): tests/test_mlx.py calls
this script with a Python that has ``mlx`` and ``mlx_lm`` (the test environment's own, or $LORATOOLS_MLX_PYTHON).

    python mlx_oracle.py make BASE OUT RANK SCALE NUM_LAYERS KIND SEED [KEY ...]
        an adapter made by mlx-lm's own LoRA code, as ``mlx_lm.lora`` saves it: the base model loaded by
        mlx_lm.utils.load_model, its layers converted by linear_to_lora_layers, the trainable parameters (lora_a,
        lora_b, DoRA's m) given seeded random values (lora_b starts at zero), saved with mx.save_safetensors
        beside the config save_config writes
    python mlx_oracle.py fuse BASE ADAPTER OUT
        the weights mlx-lm's fuse gives (load_adapters, then each layer's fuse()), saved as OUT (safetensors)

BASE is a transformers checkpoint folder (config.json + model.safetensors) of a model mlx-lm converts as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _model(base: str):  # type: ignore[no-untyped-def]
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(base))
    return model


def make(base: str, out: str, rank: str, scale: str, layers: str, kind: str, seed: str, *keys: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    model = _model(base)
    model.freeze()
    params = {"rank": int(rank), "scale": float(scale), "dropout": 0.0, "keys": list(keys) or None}
    linear_to_lora_layers(model, int(layers), params, use_dora=kind == "dora")
    mx.random.seed(int(seed))
    trained = dict(tree_flatten(model.trainable_parameters()))
    for name, value in trained.items():
        noise = mx.random.normal(value.shape) * 0.1
        trained[name] = value * (1 + noise) if name.endswith(".m") else noise
    model.load_weights(list(trained.items()), strict=False)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": kind, "num_layers": int(layers), "lora_parameters": params, "model": base}
    save_config(config, folder / "adapter_config.json")


def fuse(base: str, adapter: str, out: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    model = load_adapters(_model(base), adapter)
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    mx.save_safetensors(out, dict(tree_flatten(model.parameters())))


if __name__ == "__main__":
    {"make": make, "fuse": fuse}[sys.argv[1]](*sys.argv[2:])
