"""Train an MNIST net on the CPU and write its weights, its ONNX graph and model card: `python -m service.train
{mlp,cnn}`; `--export-only` writes the ONNX graph of the weights already there (and its entry in the card).

Deterministic for a given seed and thread count: every random draw (init, shuffling, augmentation, dropout)
comes from torch's seeded generators, and torch runs in deterministic mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from service import nets
from service.classifiers import MODELS_DIR, evaluate, layer_table, load_classifier, to_input
from service.datasets import MNIST_DIR, load_mnist

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 30, "lr": 1e-3, "batch_size": 128},
    "cnn": {"epochs": 20, "lr": 3e-3, "batch_size": 128},
}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random affine warps of `(N, 1, 28, 28)` digits: rotate +-10 deg, scale 0.9-1.1, shift +-2 px."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.9, 1.1)
    tx, ty = uniform(-2 / 14, 2 / 14), uniform(-2 / 14, 2 / 14)  # in [-1, 1] grid units: 14 px = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)

    train_set, test_set = load_mnist("train", args.data), load_mnist("test", args.data)
    x_train, y_train = to_input(train_set.images), torch.from_numpy(train_set.labels.astype("int64"))
    model = nets.build(args.name)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    max_steps = args.dry_run_batches if args.dry_run else None
    total_steps = max_steps or steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps)
    loss_fn = nn.CrossEntropyLoss()

    started = time.perf_counter()
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, (1 if args.dry_run else args.epochs) + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total_loss, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch), desc=f"{args.name} epoch {epoch}/{args.epochs}", file=sys.stderr, leave=False
        )
        for b in bar:
            if max_steps is not None and step >= max_steps:
                break
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x = augment(x_train[idx], generator) if args.augment else x_train[idx]
            loss = loss_fn(model(x), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        accuracy = evaluate(model, test_set)
        history.append({"epoch": epoch, "loss": round(total_loss / max(seen, 1), 6), "test_accuracy": accuracy})
        tqdm.write(
            f"{args.name} epoch {epoch}: loss {total_loss / max(seen, 1):.4f}, test accuracy {accuracy:.4%}",
            file=sys.stderr,
        )
    return {"model": model, "history": history, "seconds": time.perf_counter() - started}


def export_onnx(model: nn.Module, path: Path) -> dict[str, Any]:
    """The net in eval mode, normalisation included, as an ONNX graph at `path` (`pixels` (N, 1, 28, 28) float32 in
    [0, 1] -> `logits` (N, 10)), by torch's exporter (which needs the onnx and onnxscript packages: development
    requirements, not the service's); its entry for the model card. The same weights give the same bytes."""
    model = model.eval()
    with warnings.catch_warnings():  # torch's exporter warns about its own internals (treespec, its registry)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            (torch.zeros(2, 1, 28, 28),),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    # torch records where each node came from (its source's file paths and lines, its FX node): dropped, so that
    # the same weights give the same bytes in any checkout
    graph = program.model.graph
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    for holder in [program.model, graph, *graph, *values, *(v for node in graph for v in node.outputs)]:
        holder.metadata_props.clear()
    program.save(str(path))
    return {"file": path.name, "format": "onnx", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def write_outputs(args: argparse.Namespace, model: nn.Module, history: list[dict[str, float]], seconds: float) -> Path:
    """`mnist-{name}.safetensors` (weights + config), `mnist-{name}.onnx` (the same net as an ONNX graph, which
    predictions on the CPU run) and `mnist-{name}.json` (the model card)."""
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"mnist-{args.name}.safetensors"
    config: nets.NetConfig = model.config  # type: ignore[assignment]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"config": json.dumps(config.to_dict())})
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    test_accuracy = evaluate(model, load_mnist("test", args.data))
    card = {
        "name": args.name,
        "task": "MNIST handwritten digit classification (10 classes)",
        "architecture": layer_table(model),
        "config": config.to_dict(),
        "parameters": nets.parameter_count(model),
        "preprocessing": {
            "input": "(N, 1, 28, 28) float32 in [0, 1]: white digit on black, MNIST-style (20x20 box, centred by mass)",
            "normalization": f"(x - {nets.MNIST_MEAN}) / {nets.MNIST_STD}, inside the model",
        },
        "test_accuracy": test_accuracy,
        "test_set": "MNIST t10k, all 10,000 images",
        "weights": {"file": weights.name, "format": "safetensors", "sha256": sha},
        "onnx": export_onnx(model, args.out / f"mnist-{args.name}.onnx"),
        "training": {
            "command": "python -m service.train " + shlex.join(sys.argv[1:]),
            "seed": args.seed,
            "epochs": 1 if args.dry_run else args.epochs,
            "dry_run": args.dry_run,
            "batch_size": args.batch_size,
            "optimizer": f"AdamW(lr={args.lr}, weight_decay=1e-4), OneCycleLR",
            "augmentation": "random affine: rotate +-10 deg, scale 0.9-1.1, shift +-2 px" if args.augment else None,
            "threads": args.threads,
            "history": history,
            "seconds": round(seconds, 1),
        },
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "data": {"source": "MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0", "sha256_verified": True},
    }
    path: Path = args.out / f"mnist-{args.name}.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.train", description=__doc__)
    p.add_argument("name", choices=sorted(nets.NETS))
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--dry-run", action="store_true", help="a few batches only, to check the machinery")
    p.add_argument("--dry-run-batches", type=int, default=5)
    p.add_argument("--out", type=Path, default=MODELS_DIR)
    p.add_argument("--data", type=Path, default=MNIST_DIR)
    p.add_argument(
        "--export-only", action="store_true", help="no training: write the ONNX graph of the weights in --out"
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def export_only(args: argparse.Namespace) -> Path:
    """The ONNX graph of the weights in `args.out`, and its entry in their model card (nothing else changes)."""
    card_path: Path = args.out / f"mnist-{args.name}.json"
    card = json.loads(card_path.read_text())
    model = load_classifier(args.name, args.out, graph=False).on(torch.device("cpu"))  # a stale graph is no bar
    card["onnx"] = export_onnx(model, args.out / f"mnist-{args.name}.onnx")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.export_only:
        print(f"wrote {export_only(args)}")  # noqa: T201 - a CLI
        return
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        result = train(args)
        card = write_outputs(args, result["model"], result["history"], result["seconds"])
    finally:  # leave the process as it was (the tests call main in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    print(f"wrote {card}")  # noqa: T201 - a CLI


if __name__ == "__main__":
    main()
