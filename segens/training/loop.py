"""The one training loop of every member kind that runs a torch network: a kind gives only how it builds a model,
what its kept checkpoint holds and how that checkpoint scores at the original resolution.

Per fold: the training and validation images are decoded once (segens.training.data); each optimizer step draws
a shuffled batch, augments it, runs forward/backward under the chosen precision, and sets the step's learning rate
(warmup, then constant or cosine). Every ``val_every`` epochs the model is scored at the input size on the cached
validation masks (cheap); the best of those is kept as best.pt, and only that checkpoint is scored with the
competition's Dice at each image's original size. last.pt (loadable with ``weights_only=True``), written at each
validation, lets a killed fold resume after its last validated epoch.

With pseudo-labels (segens.training.pseudo) the pseudo images join the training images (never the validation
ones), the loss leaves their ignored pixels out, and best.pt and last.pt record the pseudo folder's identity
(``pseudo``: the recipe's sha256 among it); a fold started with other pseudo-labels (or none) does not resume.
Without them every step is as before, byte for byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import TextColumn

from segens.conventions.dataset import ImageRecord
from segens.conventions.dice import DiceTable, dice_per_class
from segens.errors import SegensError
from segens.infra.atomic import atomic_write, atomic_write_text
from segens.infra.progress import console, progress_bar
from segens.infra.safeload import torch_load_data, torch_load_pickle
from segens.training.augment import Augment
from segens.training.data import CachedImage, CachedImages, Contract, LabelledImages, cache_records
from segens.training.losses import WeightedLoss
from segens.training.precision import Precision, choose_precision
from segens.training.pseudo import IGNORE, PseudoSource, pseudo_items
from segens.training.settings import TrainSettings, make_optimizer

RESUME_KEYS = ("model", "optimizer", "rng", "epoch", "history", "best_dice")


@dataclass
class TrainedFold:
    """What one fold's training kept: best.pt, its Dice at the input size and at original size, per-epoch rows."""

    best_path: Path
    input_dice: float
    val_dice: float
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class NetworkRecipe:
    """What a member kind provides to the loop: ``new_model()`` a fresh module; ``payload(model)`` best.pt's
    content; ``score(path)`` the competition's Dice of a kept checkpoint on the validation images."""

    name: str
    where: str
    contract: Contract
    new_model: Callable[[], torch.nn.Module]
    payload: Callable[[torch.nn.Module], dict[str, Any]]
    score: Callable[[Path], float]
    logits: Callable[[Any], torch.Tensor] = lambda output: output


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through segens.infra.atomic: a reader never sees half a file."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def load_resume_state(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """A fold's last.pt with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts: nothing in
    it can run code); only with ``trust_pickle`` a file that needs a full unpickler (an older segens wrote some)."""
    saved = torch_load_data(path, "resume state (delete it to train the fold from its first epoch)")
    if saved is None:
        if not trust_pickle:
            raise SegensError(f"{path}: resume state holds pickled objects; loading it runs code stored in the file. "
                              "Pass --trust-pickle if you wrote it (an older segens did), or delete it to train the "
                              "fold from its first epoch")
        saved = torch_load_pickle(path, "resume state")
    if not isinstance(saved, dict) or any(key not in saved for key in RESUME_KEYS):
        raise SegensError(f"{path}: not a segens resume state (needs {', '.join(RESUME_KEYS)}); delete it to train the "
                          "fold from its first epoch")
    return saved


def input_size_dice(model: torch.nn.Module, items: Sequence[CachedImage], contract: Contract, precision: Precision,
                    logits: Callable[[Any], torch.Tensor], batch_size: int = 8) -> float:
    """The competition's Dice formula at the input size: sigmoid > 0.5 of ``model`` on cached images against their
    cached (29, h, w) masks, mean over images per class, then over classes (0.0 without images)."""
    if not items:
        return 0.0
    model.eval()
    table = DiceTable()
    device = precision.device
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pixels = torch.from_numpy(np.stack([_channels_first(item.image) for item in chunk]))
            batch = precision.layout(contract.to_tensor(pixels).to(device))
            with precision.autocast():
                out = logits(model(batch))
            predicted = (out.float() > 0).cpu().numpy()  # sigmoid(x) > 0.5 exactly where x > 0
            for item, pred in zip(chunk, predicted):
                table.add(item.key, dice_per_class(pred, item.masks.astype(bool)))
    return float(table.mean())


def _channels_first(image: np.ndarray) -> np.ndarray:
    return image[None] if image.ndim == 2 else np.ascontiguousarray(image.transpose(2, 0, 1))


def train_network_fold(recipe: NetworkRecipe, settings: TrainSettings, fold: int, train: Sequence[ImageRecord],
                       val: Sequence[ImageRecord], out_dir: Path, device: torch.device, progress: bool = True,
                       trust_pickle: bool = False, pseudo: PseudoSource | None = None) -> TrainedFold:
    """Train one fold into ``out_dir`` (best.pt, last.pt, history.json), resuming after last.pt's epoch; see the
    module docstring. The returned ``val_dice`` is best.pt's competition Dice at the original size. ``pseudo``:
    pseudo-labelled images added to ``train`` (their ignored pixels left out of the loss)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    torch.manual_seed(settings.seed + fold)
    precision = choose_precision(device, settings.amp, settings.channels_last)
    model = precision.layout(recipe.new_model().to(device))
    optimizer = make_optimizer(model, settings)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
               if settings.scheduler == "plateau" else None)
    scaler = precision.grad_scaler()
    loss_fn = WeightedLoss(settings.loss, recipe.where, ignore=None if pseudo is None else IGNORE).to(device)
    augment = Augment(settings.augment, recipe.where)
    identity = None if pseudo is None else pseudo.identity()
    payload = recipe.payload if identity is None else (lambda model: {**recipe.payload(model), "pseudo": identity})

    batch_size = settings.batch_size
    count = len(train) + (0 if pseudo is None else len(pseudo.records))
    drop_last = count > batch_size
    steps_per_epoch = count // batch_size if drop_last else 1
    total = settings.total_steps(steps_per_epoch)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "best_dice": -1.0, "best_input_dice": -1.0,
                             "val_dice": None}
    if identity is not None:
        state["pseudo"] = identity
    if last_path.exists():
        saved = load_resume_state(last_path, trust_pickle)
        if saved.get("pseudo") != identity:
            raise SegensError(f"{last_path}: this fold was started {_pseudo_words(saved.get('pseudo'))}, and is now "
                              f"trained {_pseudo_words(identity)}; delete {out_dir} to train the fold again, or train "
                              "as it was started")
        try:  # a spec changed since the run was interrupted (another encoder, optimizer, precision) does not fit
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if plateau is not None and saved.get("scheduler"):
                plateau.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            message = " ".join(str(exc).split())[:200]
            raise SegensError(f"{last_path}: this fold's resume state does not fit the member spec as it is now "
                              f"({type(exc).__name__}: {message}); delete it to train the fold from its first "
                              "epoch, or restore the spec it was started with") from None
        state.update({key: saved[key] for key in state if key in saved})
        state["step"] = int(saved.get("step", state["epoch"] * steps_per_epoch))
        if state["step"] < total:
            console.print(f"{recipe.name} fold {fold}: resuming after epoch {state['epoch']}", markup=False)

    if state["step"] < total:
        epochs = state["epoch"] + math.ceil((total - state["step"]) / steps_per_epoch)
        extra = "" if pseudo is None else f" + {len(pseudo.records)} pseudo-labelled"
        console.print(f"{recipe.name} fold {fold}: {total} steps of batch {batch_size} ({steps_per_epoch} an epoch) on "
                      f"{len(train)}{extra} images, {precision.describe()} on {device}", markup=False)
        cache_folder = out_dir.parent / "cache" if settings.cache == "disk" else None
        if settings.cache == "none":
            dataset = LabelledImages(train, recipe.contract, augment)
        else:
            dataset = CachedImages(cache_records(train, recipe.contract, cache_folder, progress, "decode train"),
                                   recipe.contract, augment)
        if pseudo is not None:  # decoded in memory whatever the cache setting; never in the validation images
            dataset = torch.utils.data.ConcatDataset(
                [dataset, CachedImages(pseudo_items(pseudo, recipe.contract, progress), recipe.contract, augment)])
        val_items = cache_records(val, recipe.contract, cache_folder, progress, "decode val")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             num_workers=settings.workers, drop_last=drop_last,
                                             pin_memory=device.type == "cuda")
        report_every = max(1, epochs // 10)
        loss_column = TextColumn("loss {task.fields[loss]:.4f}")
        with progress_bar("step", disable=not progress, extra=(loss_column,), transient=True) as bar:
            task = bar.add_task(f"{recipe.name} fold {fold}", total=total, completed=state["step"], loss=float("nan"))
            while state["step"] < total:
                epoch = state["epoch"] + 1
                loss = _train_epoch(model, loader, optimizer, plateau, scaler, loss_fn, precision, recipe, settings,
                                    state, total, lambda value: bar.update(task, advance=1, loss=value))
                row: dict[str, Any] = {"epoch": epoch, "step": state["step"], "loss": round(loss, 6),
                                       "lr": optimizer.param_groups[0]["lr"]}
                state["epoch"] = epoch
                finished = state["step"] >= total
                if epoch % settings.val_every == 0 or finished:
                    dice = input_size_dice(model, val_items, recipe.contract, precision, recipe.logits)
                    if plateau is not None:
                        plateau.step(dice)
                    improved = dice > state["best_input_dice"]
                    row.update({"val_dice_input": round(dice, 6), "best": improved})
                    if improved:
                        state["best_input_dice"] = dice
                        state["val_dice"] = None
                        save_atomic(payload(model), best_path)
                    if improved or epoch % report_every == 0 or finished:
                        console.print(f"{recipe.name} fold {fold}: epoch {epoch}/{epochs} step {state['step']}/{total}"
                                      f"  loss {row['loss']:.4f}  val Dice at input size {dice:.4f}"
                                      f"{'  (best)' if improved else ''}", markup=False)
                state["history"].append(row)
                if "val_dice_input" in row:  # saved where validated: a killed run redoes <= val_every epochs
                    _save_state(last_path, model, optimizer, plateau, scaler, state)
                    atomic_write_text(out_dir / "history.json", json.dumps(state["history"], indent=1))
    if not best_path.is_file():
        raise SegensError(f"{out_dir}: training ended without best.pt; delete {last_path} to train the fold again")
    if state["val_dice"] is None:
        state["val_dice"] = float(recipe.score(best_path))  # the competition's Dice, at each image's own size
        state["best_dice"] = state["val_dice"]
        _save_state(last_path, model, optimizer, plateau, scaler, state)
        console.print(f"{recipe.name} fold {fold}: best.pt (val Dice at input size {state['best_input_dice']:.4f}) "
                      f"scores {state['val_dice']:.4f} at original size", markup=False)
    return TrainedFold(best_path, float(state["best_input_dice"]), float(state["val_dice"]), state["history"])


def _pseudo_words(identity: dict[str, Any] | None) -> str:
    """How an error names the pseudo-labels a fold was trained with."""
    if identity is None:
        return "without pseudo-labels"
    recipe = str(identity.get("recipe_sha256"))[:12]
    return f"with the pseudo-labels of {identity.get('folder')} (recipe sha256 {recipe})"


def _train_epoch(model, loader, optimizer, plateau, scaler, loss_fn, precision: Precision, recipe: NetworkRecipe,
                 settings: TrainSettings, state: dict[str, Any], total: int, advance: Callable[[float], None]) -> float:
    """One pass over ``loader`` (stopping at ``total`` steps); counts steps in ``state``; the mean loss."""
    model.train()
    loss_sum, seen = 0.0, 0
    for images, masks in loader:
        if state["step"] >= total:
            break
        if plateau is None:  # plateau owns the lr itself
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * settings.lr_factor(state["step"], total)
        images = precision.layout(images.to(precision.device, non_blocking=True))
        masks = masks.to(precision.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            out = recipe.logits(model(images))
        loss = loss_fn(out.float(), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        state["step"] += 1
        loss_sum += float(loss.detach()) * len(images)
        seen += len(images)
        advance(loss_sum / seen)
    return loss_sum / max(seen, 1)


def _save_state(path: Path, model, optimizer, plateau, scaler, state: dict[str, Any]) -> None:
    """last.pt: only tensors, numbers, strings, lists and dicts (loads with ``weights_only=True``)."""
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": plateau.state_dict() if plateau is not None else None,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "rng": torch.get_rng_state(), **state}, path)
