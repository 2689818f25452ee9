"""Classification metrics of a model on a dataset: top-1/top-5, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

import io
import types
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.data import BatchLoader, ImageDataset
from visionmix.engine.config import EVAL_BATCH_SIZE
from visionmix.engine.distributed import DistContext, all_reduce_sum
from visionmix.errors import InvalidValue
from visionmix.files import atomic_write
from visionmix.module_state import eval_mode, no_tf32


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset | BatchLoader, device: torch.device | str | None = None, *,
             batch_size: int = EVAL_BATCH_SIZE, ctx: DistContext | None = None) -> dict[str, Any]:
    """Evaluate ``model`` in eval mode (its mode is restored afterwards) on every sample of ``data``.

    Returns percentages ``top1``, ``top5`` (top-min(5, C)), ``per_class`` (``None`` for a class with no sample),
    the mean cross-entropy ``loss`` (no label smoothing), ``confusion`` (rows = true class, columns = predicted)
    and ``num_samples``. With ``ctx`` distributed, each rank evaluates its shard and the counts are summed.
    """
    if isinstance(data, ImageDataset):
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        if device is None:
            device = next(model.parameters()).device
        data = BatchLoader(data, batch_size, train=False, rank=rank, world_size=world, device=device)
    num_classes = data.num_classes
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=data.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    top5 = torch.zeros((), dtype=torch.int64, device=data.device)
    with eval_mode(model):
        for images, labels in data:  # nothing here waits for the device: one read at the end
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            ranked = logits.topk(k, dim=1).indices
            top5 += (ranked == labels[:, None]).any(1).sum()
            # index_add_, not bincount: bincount reads the largest index back to size its output
            confusion.index_add_(0, labels * num_classes + ranked[:, 0], torch.ones_like(labels))
    totals = torch.cat([confusion.double(), loss_sum[None], top5[None].double()])  # exact: counts < 2^53
    values = all_reduce_sum(totals, ctx).tolist() if ctx is not None else totals.tolist()
    counts = torch.tensor(values[:-2], dtype=torch.int64).view(num_classes, num_classes)
    return metrics_from_counts(counts, values[-2], int(values[-1]))


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches`` passed through ``model`` as
    it is now, so eval mode uses statistics of the final weights (after a short run the running averages still lag
    them). Like ``torch.optim.swa_utils.update_bn`` (a cumulative average), but only the norms run in train mode:
    dropout and drop-path stay off, so the statistics are those of the network evaluation runs. Batch k enters with
    momentum 1/k, the factor BatchNorm computes for ``momentum=None`` as ``1 / float(num_batches_tracked)``, but
    without that read of a device value per norm and batch, which on a GPU makes the host wait for every forward
    (it took 4x the evaluation's time with 8 runs on one H200). Returns how many norms were recomputed; every
    module's mode and momentum are restored.

    A :class:`~torch.nn.SyncBatchNorm` runs as a plain BatchNorm here (this process's batches only): in train mode
    its forward would start a collective that no other rank joins (the trainer recomputes on rank 0 alone), so
    it would wait until the process group's time-out."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    synced = [m for m in norms if isinstance(m, nn.SyncBatchNorm)]
    try:
        for m in synced:  # an instance attribute shadows SyncBatchNorm.forward until it is deleted below
            m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)
        with eval_mode(model):
            for m in norms:
                m.reset_running_stats()
                m.train()
            for k, x in enumerate(batches, start=1):
                for m in norms:
                    m.momentum = 1.0 / k
                model(x)
    finally:
        for m in synced:
            del m.forward
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return len(norms)


def metrics_from_counts(confusion: torch.Tensor, loss_sum: float, top5_correct: int) -> dict[str, Any]:
    """Percent accuracies and the mean loss from a confusion matrix and summed loss / top-5 hits."""
    total = int(confusion.sum())
    if total == 0:
        raise InvalidValue("cannot evaluate on an empty dataset")
    per_class_total = confusion.sum(1)
    diagonal = confusion.diagonal()
    per_class = [100.0 * int(d) / int(t) if t else None for d, t in zip(diagonal, per_class_total, strict=True)]
    return {
        "num_samples": total,
        "top1": 100.0 * int(diagonal.sum()) / total,
        "top5": 100.0 * top5_correct / total,
        "loss": loss_sum / total,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                   title: str = "") -> bool:
    """Save the row-normalised confusion matrix as a PNG; ``False`` (nothing written) without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry is touched
    except ImportError:
        return False
    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write(path, png.getvalue())
    return True


EVAL_WEIGHTS = ("auto", "ema", "raw")


class _OnCpu(nn.Module):
    """A :class:`visionmix.Deployed` CPU backend as a module for :func:`evaluate`: logits on the input's device."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.cpu()).to(x.device)


def evaluate_run(run_dir: str | Path, *, split: str = "test", deploy: bool = False, quantize: str | None = None,
                 data_dir: str | None = None, max_samples: int | None = None, weights: str = "auto",
                 batch_size: int = EVAL_BATCH_SIZE, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Evaluate a run directory's model on ``split`` and write ``eval.json`` + ``confusion.png`` into it; ``deploy``
    also evaluates ``visionmix.reparameterize(model)`` (``eval-deploy.json``, ``confusion-deploy.png``) and
    ``quantize="int8"`` its int8 onnxruntime form (``visionmix.deploy(..., quantize="int8")``; ``*-int8.*``).

    ``max_samples``: None = the run's own subset, 0 = all; ``weights``: "auto" = the EMA weights if the run kept
    them. Returns ``{"forms": {form: record}, "classes", "checks": {form: check}, "written": [paths]}``: each form
    but the trained one is checked against it: ``same_predictions`` (equal confusion matrices), ``top1_change``
    (percentage points) and ``max_abs_logit_diff`` on the first batch.
    """
    from visionmix.checks import check_choice
    from visionmix.data import build_dataset
    from visionmix.deployment import QUANTIZE
    from visionmix.deployment import deploy as deploy_backend
    from visionmix.engine.config import STREAMED
    from visionmix.engine.run_files import EVAL_FORM_SUFFIX, load_run
    from visionmix.files import atomic_write_json
    from visionmix.reparam import reparameterize

    check_choice("weights", weights, EVAL_WEIGHTS)
    if quantize is not None:
        check_choice("quantize", quantize, QUANTIZE)
    run_dir = Path(run_dir)
    model, meta = load_run(run_dir, ema={"auto": None, "ema": True, "raw": False}[weights])
    cfg, info = meta["config"], meta["data"]
    size = info["image_size"]
    run_limit = cfg["max_eval_samples" if split == "test" else "max_train_samples"]
    limit = run_limit if max_samples is None else max_samples or None
    if cfg["data"] in STREAMED:
        dataset = _streamed_split(meta, split, data_dir, batch_size, device)
    else:
        dataset = build_dataset(cfg["data"], split, data_dir or cfg["data_dir"], limit,
                                image_size=size[0] if size[0] == size[1] else None).with_stats(info["mean"],
                                                                                               info["std"])
    forms: dict[str, nn.Module] = {"trained": model.to(device)}
    params = {"trained": sum(p.numel() for p in model.parameters())}
    if deploy or quantize is not None:  # forms checked against the trained one on the first batch
        batches = dataset if cfg["data"] in STREAMED else BatchLoader(dataset, 256, train=False,
                                                                      device=torch.device(device))
        first, _ = next(iter(batches))
        deployed = reparameterize(model)
        params["deployed"] = params["int8"] = sum(p.numel() for p in deployed.parameters())
        if deploy:
            forms["deployed"] = deployed
        if quantize is not None:
            forms[quantize] = _OnCpu(deploy_backend(deployed, first[:8].cpu(), quantize=quantize))
    report: dict[str, Any] = {"forms": {}, "classes": list(info["classes"]), "checks": {}, "written": []}
    # the forms are compared (same predictions, logit differences) in float32: TF32 would differ by itself
    with no_tf32() if len(forms) > 1 else nullcontext():
        for form, net in forms.items():
            metrics = evaluate(net, dataset, device, batch_size=batch_size)
            suffix = EVAL_FORM_SUFFIX[form]
            record = {"run": str(run_dir), "model": meta["model"], "form": form, "split": split,
                      "params": params[form], **metrics}
            atomic_write_json(run_dir / f"eval{suffix}.json", record)
            report["written"].append(run_dir / f"eval{suffix}.json")
            title = f"{meta['model']} ({form}) on {cfg['data']} {split}: top-1 {metrics['top1']:.2f}%"
            confusion_png = run_dir / f"confusion{suffix}.png"
            if plot_confusion(metrics["confusion"], info["classes"], confusion_png, title=title):
                report["written"].append(confusion_png)
            report["forms"][form] = record
        if len(forms) > 1:
            trained = report["forms"]["trained"]
            with torch.no_grad(), eval_mode(model):
                reference = model(first)
                for form in list(forms)[1:]:
                    with eval_mode(forms[form]):
                        diff = (forms[form](first) - reference).abs().max().item()
                    record = report["forms"][form]
                    report["checks"][form] = {"same_predictions": record["confusion"] == trained["confusion"],
                                              "top1_change": record["top1"] - trained["top1"],
                                              "max_abs_logit_diff": diff}
    return report


def _streamed_split(meta: dict[str, Any], split: str, data_dir: str | None, batch_size: int,
                    device: str | torch.device) -> Any:
    """A streamed run's ``split`` (test = the val tree or shards) through its recipe's evaluation transform."""
    from visionmix.data.sources import open_source
    from visionmix.engine.config import TrainConfig
    from visionmix.engine.pipeline import DataInfo, streamed_eval_loader

    cfg = TrainConfig.from_dict(meta["config"])
    source = open_source(cfg.data, data_dir or cfg.data_dir, "val" if split == "test" else "train",
                         val_fraction=cfg.val_fraction, seed=cfg.seed)
    return streamed_eval_loader(cfg, source, DataInfo.from_meta(meta["data"]), device=device, batch_size=batch_size)
