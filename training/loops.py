"""Training loops: supervised CNN, GAN (WGAN-GP critic) and self-supervised, with resume, EMA and logs.

A run lives in one folder (``runs/<name>/`` by default)::

    config.toml        the full config (defaults filled in), copied at the start
    log.csv            step, losses, learning rate, seconds, validation numbers
    checkpoint.pt      everything needed to resume: step, network, EMA, optimisers, scheduler, critic
    model/             the exported model folder (EMA weights + card), written at the end

Determinism: every batch is a pure function of ``(seed, step)`` (patches are drawn by index, see
``training.data``), so a resumed run draws the batches the uninterrupted one would have drawn.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainingConfig, config_to_toml

LOGGER = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
MODEL_DIR = "model"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------------
# Data for a run
# ---------------------------------------------------------------------------------------------------------------


def _even(n: int, k: int) -> list[int]:
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def load_series_list(cfg: TrainingConfig, names: list[str]):
    from training.data import read_series

    out = []
    for name in names:
        found = read_series(cfg.data_path(name))
        if not found:
            raise FileNotFoundError(f"no DICOM series in {cfg.data_path(name)}")
        out.extend(found)
    return out


def normalization_for(cfg: TrainingConfig):
    from training.data import ct_normalization, per_image_normalization
    from training.modalities import recipe_for

    recipe = recipe_for(cfg.noise.kind)
    if recipe is not None and hasattr(recipe, "normalization"):  # e.g. endoscopy: fixed 0-255, never per image
        return recipe.normalization(cfg)
    return ct_normalization() if cfg.modality == "CT" else per_image_normalization()


def build_datasets(cfg: TrainingConfig, progress: bool = True):
    """``(train dataset, validation dataset or None, data summary)`` for ``cfg``."""
    from training.data import NoisyCache, RealPairs, SelfSupervisedPairs, SimulatedPairs
    from training.modalities import recipe_for

    recipe = recipe_for(cfg.noise.kind)
    if recipe is not None:
        return recipe.build_datasets(cfg, progress=progress)

    norm = normalization_for(cfg)
    d = cfg.data
    summary: dict[str, Any] = {"train": list(d.train), "validation": list(d.validation), "pairs": d.pairs}
    length = cfg.train.steps * d.batch

    def make(names, seed, n, augment):
        if d.pairs == "real":
            pairs = [(load_series_list(cfg, [lo])[0], load_series_list(cfg, [hi])[0]) for lo, hi in names]
            return RealPairs(pairs, d.patch, n, norm, seed=seed, augment=augment), {}
        series = load_series_list(cfg, names)
        if d.pairs == "self-supervised":
            return SelfSupervisedPairs(series, d.patch, n, norm, method=d.self_supervised, seed=seed,
                                       augment=augment), {}
        slices = {s.key: _even(len(s.volume), d.max_slices) for s in series}
        settings = copy.copy(cfg.noise)
        settings.seed = seed
        cache = NoisyCache(series, settings, slices=slices, progress=progress, cache_dir=d.noise_cache or None)
        return SimulatedPairs(series, cache, d.patch, n, norm, seed=seed, augment=augment), cache.flux

    train_names = d.real_pairs if d.pairs == "real" else d.train
    train, flux = make(train_names, cfg.seed, length, True)
    cache = getattr(train, "cache", None)
    summary["slices"] = len(cache.entries) if cache is not None else None
    if flux:
        summary["flux"] = {k: float(f"{v:.4g}") for k, v in flux.items()}
    val = None
    if d.validation and d.pairs != "real":
        val, _ = make(d.validation, cfg.seed + 1000, d.validation_patches, False)
    return train, val, summary


def get_batch(dataset, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[(step * batch + i) % len(dataset)] for i in range(batch)]
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


class _IndicesFrom(torch.utils.data.Sampler):
    """Dataset indices ``start, start + 1, ...`` modulo its length, without end: the order :func:`get_batch` uses."""

    def __init__(self, start: int, length: int) -> None:
        self.start, self.length = start, length

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while True:
            yield i % self.length
            i += 1


def loader_workers(requested: int, device: torch.device) -> int:
    """Processes that cut patches: ``requested``, or with -1 none on the CPU (the network needs the cores) and up
    to 8 beside a GPU (one Python thread cuts about 2,000 128 px patches a second: too few to keep a GPU busy)."""
    if requested >= 0:
        return requested
    return 0 if device.type != "cuda" else max(0, min(8, (os.cpu_count() or 1) - 2))


def batches(dataset, start_step: int, batch: int, workers: int = 0,
            pin_memory: bool = False) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """Training batches from ``start_step`` on, without end; the same batches as :func:`get_batch` at each step,
    whether cut in this process or by ``workers`` worker processes (each item is a function of its index)."""
    if workers <= 0:
        step = start_step
        while True:
            yield get_batch(dataset, step, batch)
            step += 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=_IndicesFrom(start_step * batch,
                                         len(dataset)), num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4, persistent_workers=False)
    yield from loader


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a network's weights (kept in float32)."""

    def __init__(self, network: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(network).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are not averaged in for long
        for s, p in zip(self.shadow.state_dict().values(), network.state_dict().values()):
            if s.dtype.is_floating_point:
                s.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                s.copy_(p)


def cosine_schedule(optimizer, steps: int | Callable[[], int], warmup: int, lr: float, lr_min: float):
    """Linear warm-up, then cosine decay to ``lr_min`` at ``steps`` (a number, or a callable read at every step:
    a time-limited run sets its number of steps once it has measured its speed)."""
    total = steps if callable(steps) else (lambda: steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total() - warmup)
        return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(1.0, t)))) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


#: Scales of ``multiscale-l1``: the L1 of the output and target average-pooled by each factor, summed.
MULTISCALE_FACTORS = (1, 2, 4, 8)


def pixel_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``l1``, ``mse``, or ``multiscale-l1``: L1 at full resolution plus L1 of 2x, 4x and 8x average-pooled images.

    Pooling averages white noise away but keeps low-frequency noise, blotches of lesion size and HU shifts, so the
    coarse terms weigh the low frequencies a plain L1 leaves behind (where low-contrast lesions live).
    """
    if kind == "l1":
        return F.l1_loss(output, target)
    if kind == "mse":
        return F.mse_loss(output, target)
    if kind == "l1-colour-mean":  # colour: L1 plus the L1 of each patch's per-channel means (no colour cast)
        return F.l1_loss(output, target) + F.l1_loss(output.mean(dim=(-2, -1)), target.mean(dim=(-2, -1)))
    if kind == "multiscale-l1":
        total = output.new_zeros(())
        for k in MULTISCALE_FACTORS:
            if k > 1 and min(output.shape[-2:]) < 2 * k:
                break
            a = output if k == 1 else F.avg_pool2d(output, k)
            b = target if k == 1 else F.avg_pool2d(target, k)
            total = total + F.l1_loss(a, b)
        return total
    raise ValueError(f"unknown loss {kind!r} (l1, mse, multiscale-l1, l1-colour-mean)")


def _betas(values: Sequence[float]) -> tuple[float, float]:
    """Adam's ``(beta1, beta2)`` from the config's ``gan.betas`` list."""
    if len(values) != 2:
        raise ValueError(f"gan.betas must have 2 items (beta1, beta2), not {len(values)}")
    return float(values[0]), float(values[1])


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): ``(||grad D(x_hat)||_2 - 1)^2`` on random interpolates."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score = critic(x_hat)
    grad, = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def neighbor_masks(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor2Neighbor pixel choices per 2x2 cell: two flat index tensors into the 4 cell positions."""
    n = int(np.prod(shape))
    first = torch.randint(0, 4, (n,), generator=generator)
    neighbours = torch.tensor([[1, 2], [0, 3], [0, 3], [1, 2]])
    second = neighbours[first, torch.randint(0, 2, (n,), generator=generator)]
    return first.view(shape), second.view(shape)


def subsample(image: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H/2, W/2)`` taking position ``choice`` (0-3) of each 2x2 cell."""
    n, c, h, w = image.shape
    cells = F.pixel_unshuffle(image[..., : h // 2 * 2, : w // 2 * 2], 2)  # (N, 4C, h/2, w/2), per channel 4 slots
    cells = cells.view(n, c, 4, h // 2, w // 2)
    return torch.gather(cells, 2, choice.view(n, 1, 1, h // 2, w // 2).expand(n, c, 1, h // 2, w // 2))[:, :, 0]


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    first_loss: float
    seconds: float
    model_dir: Path | None


class Trainer:
    """Runs one config in one run folder; ``resume=True`` continues from ``checkpoint.pt``."""

    def __init__(self, cfg: TrainingConfig, run_dir: str | os.PathLike, resume: bool = False,
                 progress: bool = True, stop_after: int | None = None) -> None:
        from models.networks import build_network

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stop_after = stop_after  # stop (as if interrupted) after this many steps: used by tests
        if cfg.train.threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest convolutions
        seed_everything(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.run_dir / CHECKPOINT
        if ckpt_path.exists() and not resume:
            raise FileExistsError(f"{self.run_dir} already has a checkpoint; pass --resume or use another run folder")
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        if cfg.source and Path(cfg.source).is_file():
            shutil.copyfile(cfg.source, self.run_dir / "config.original.toml")

        self.network = build_network(cfg.model.architecture, **cfg.model.arguments)
        if cfg.model.init:
            from models.folder import load_model_folder

            init = load_model_folder(cfg.data_path(cfg.model.init) if not Path(cfg.model.init).exists()
                                     else cfg.model.init, "cpu")
            self.network.load_state_dict(init.network.state_dict())
            LOGGER.info("started from %s", cfg.model.init)
        self.network.to(self.device)
        t = cfg.train
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                          betas=_betas(cfg.gan.betas) if cfg.mode == "gan" else (0.9, 0.999))
        # The run's length: train.steps, or fewer once a time limit has measured the speed (see _plan_steps).
        self.planned_steps = t.steps
        self.scheduler = cosine_schedule(self.optimizer, lambda: self.planned_steps, t.warmup, t.lr, t.lr_min)
        self.ema = EMA(self.network, t.ema) if t.ema > 0 else None
        self.critic = self.critic_opt = None
        if cfg.mode == "gan":
            self.critic = build_network(cfg.gan.critic, **cfg.gan.critic_arguments).to(self.device)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.gan.critic_lr,
                                               betas=_betas(cfg.gan.betas))
        self.use_amp = bool(t.amp and self.device.type == "cuda")
        self.step = 0
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 7)
        if resume and ckpt_path.exists():
            self._load_checkpoint(ckpt_path)
        self.train_set, self.val_set, self.data_summary = build_datasets(cfg, progress)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "planned_steps": self.planned_steps,
            "network": self.network.state_dict(),
            "ema": self.ema.shadow.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "critic": self.critic.state_dict() if self.critic else None,
            "critic_opt": self.critic_opt.state_dict() if self.critic_opt else None,
            "torch_rng": torch.get_rng_state(),
            "noise_gen": self.noise_gen.get_state(),
            "architecture": self.cfg.model.architecture,
            "arguments": self.cfg.model.arguments,
        }

    def save_checkpoint(self) -> None:
        tmp = self.run_dir / (CHECKPOINT + ".tmp")
        torch.save(self._state(), tmp)
        os.replace(tmp, self.run_dir / CHECKPOINT)

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.step = int(state["step"])
        self.planned_steps = min(self.cfg.train.steps, int(state.get("planned_steps", self.cfg.train.steps)))
        self.network.load_state_dict(state["network"])
        if self.ema and state["ema"] is not None:
            self.ema.shadow.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None and self.critic_opt is not None and state["critic"] is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        torch.set_rng_state(state["torch_rng"])
        self.noise_gen.set_state(state["noise_gen"])
        LOGGER.info("resumed %s at step %d", self.run_dir, self.step)

    # -- steps -----------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _supervised_step(self, x, y) -> dict[str, float]:
        with self._autocast():
            out = self.network(x)
            loss = pixel_loss(self.cfg.train.loss, out.float(), y)
        self._backward(loss)
        return {"loss": float(loss.detach())}

    def _n2n_step(self, x) -> dict[str, float]:
        """Neighbor2Neighbor: ``|f(g1) - g2|^2 + gamma |f(g1) - g2 - (g1(f(y)) - g2(f(y)))|^2``."""
        n, _, h, w = x.shape
        first, second = neighbor_masks((n, h // 2, w // 2), self.noise_gen)
        first, second = first.to(x.device), second.to(x.device)
        g1, g2 = subsample(x, first), subsample(x, second)
        with torch.no_grad():
            full = self.network(x)
        f1, f2 = subsample(full, first), subsample(full, second)
        with self._autocast():
            out = self.network(g1).float()
        diff = out - g2
        rec = (diff ** 2).mean()
        reg = ((diff - (f1 - f2)) ** 2).mean()
        loss = rec + self.cfg.train.n2n_gamma * reg
        self._backward(loss)
        return {"loss": float(rec.detach()), "regulariser": float(reg.detach())}

    def _critic_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the critic sees: the image, or its clamped high-pass (noise texture), times the input scale."""
        g = self.cfg.gan
        if g.critic_highpass > 0:
            images = images - F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
            images = images.clamp(-g.critic_highpass, g.critic_highpass)
        return images * float(g.critic_input_scale)

    def _gan_step(self, x, y) -> dict[str, float]:
        g = self.cfg.gan
        view = self._critic_view
        critic, critic_opt = self.critic, self.critic_opt
        if critic is None or critic_opt is None:
            raise RuntimeError("a GAN step needs the critic, which is only built when mode is 'gan'")
        # Critic: n_critic updates on the same batch, generator frozen.
        with torch.no_grad():
            fake = self.network(x).float()
        for _ in range(g.critic_steps):
            critic_opt.zero_grad(set_to_none=True)
            real_v, fake_v = view(y), view(fake)
            w_dist = critic(real_v).mean() - critic(fake_v).mean()
            gp = gradient_penalty(critic, real_v, fake_v)
            critic_loss = -w_dist + g.gp_weight * gp
            critic_loss.backward()
            critic_opt.step()
        numbers = {"wasserstein": float(w_dist.detach()), "gp": float(gp.detach())}
        if self.step < g.critic_warmup:  # critic warm-up: the generator waits
            numbers["loss"] = float(pixel_loss(self.cfg.train.loss, fake, y))
            self.scheduler.step()
            return numbers
        # Generator: pixel loss + small adversarial term.
        for p in critic.parameters():
            p.requires_grad_(False)
        out = self.network(x).float()
        pix = pixel_loss(self.cfg.train.loss, out, y)
        adv = -critic(view(out)).mean()
        loss = pix + g.adversarial_weight * adv
        self._backward(loss)
        for p in critic.parameters():
            p.requires_grad_(True)
        return {**numbers, "loss": float(pix.detach()), "adversarial": float(adv.detach())}

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.network, self.step)

    # -- validation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if self.val_set is None:
            return {}
        net = self.ema.shadow if self.ema else self.network
        net.eval()
        total_in, total_out, n = 0.0, 0.0, 0
        for start in range(0, len(self.val_set), self.cfg.data.batch):
            idx = range(start, min(len(self.val_set), start + self.cfg.data.batch))
            x = torch.stack([self.val_set[i][0] for i in idx]).to(self.device)
            y = torch.stack([self.val_set[i][1] for i in idx]).to(self.device)
            out = net(x).float()
            c = (x.shape[1] - y.shape[1]) // 2  # neighbouring frames in: the input is its centre frame
            total_in += float(F.mse_loss(x[:, c:c + y.shape[1]], y, reduction="sum"))
            total_out += float(F.mse_loss(out, y, reduction="sum"))
            n += y.numel()
        self.network.train()
        return {"val_mse_input": total_in / n, "val_mse": total_out / n,
                "val_gain_db": 10 * math.log10(max(total_in, 1e-20) / max(total_out, 1e-20))}

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        from tqdm import tqdm

        cfg, t = self.cfg, self.cfg.train
        log_path = self.run_dir / LOG
        fields = ["step", "loss", "adversarial", "wasserstein", "gp", "regulariser", "lr", "seconds",
                  "val_mse_input", "val_mse", "val_gain_db"]
        if self.step == 0 or not log_path.exists():
            with open(log_path, "w", newline="") as fh:
                csv.DictWriter(fh, fields).writeheader()
        self.network.train()
        started = time.monotonic()
        first_loss = last_loss = float("nan")
        running: list[float] = []
        bar = tqdm(total=self.planned_steps, initial=self.step, desc=cfg.name, disable=not self.progress,
                   dynamic_ncols=True)
        steps_this_call = 0
        workers = loader_workers(cfg.data.workers, self.device)
        source = batches(self.train_set, self.step, cfg.data.batch, workers, pin_memory=self.device.type == "cuda")
        while self.step < self.planned_steps:
            if self.stop_after is not None and steps_this_call >= self.stop_after:
                break
            x, y = next(source)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if cfg.mode == "gan":
                numbers = self._gan_step(x, y)
            elif cfg.mode == "self-supervised" and cfg.data.self_supervised == "neighbor2neighbor":
                numbers = self._n2n_step(x)
            else:
                numbers = self._supervised_step(x, y)
            self.step += 1
            steps_this_call += 1
            if t.time_limit_minutes > 0 and (steps_this_call == 100 or self.step % max(1, t.validate_every) == 0):
                self._plan_steps(steps_this_call, time.monotonic() - started, t.time_limit_minutes * 60)
                bar.total = self.planned_steps
            last_loss = numbers["loss"]
            if math.isnan(first_loss):
                first_loss = last_loss
            running.append(last_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(running[-50:]):.4g}", lr=f"{self.scheduler.get_last_lr()[0]:.2g}")
            row: dict[str, Any] = {}
            if self.step % t.log_every == 0 or self.step == self.planned_steps:
                row = {**numbers, "loss": float(np.mean(running[-t.log_every:]))}
            if t.validate_every and (self.step % t.validate_every == 0 or self.step == self.planned_steps):
                row.update(self.validate())
                if "val_gain_db" in row:
                    bar.write(f"step {self.step}: validation gain {row['val_gain_db']:.2f} dB")
            if row:
                row.update(step=self.step, lr=self.scheduler.get_last_lr()[0],
                           seconds=round(time.monotonic() - started, 2))
                with open(log_path, "a", newline="") as fh:
                    csv.DictWriter(fh, fields, extrasaction="ignore").writerow(row)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        source.close()  # stops the loader's worker processes
        seconds = time.monotonic() - started
        self.save_checkpoint()
        model_dir = None
        if self.step >= self.planned_steps:
            model_dir = self.export(self.run_dir / MODEL_DIR)
        return RunResult(self.run_dir, self.step, last_loss, first_loss, seconds, model_dir)

    def _plan_steps(self, steps_done: int, seconds: float, limit_seconds: float) -> None:
        """Fit the run into ``limit_seconds``: the steps the measured speed allows (never more than train.steps,
        never fewer than done); the learning-rate schedule follows, so a time-limited run still anneals."""
        left = max(0.0, limit_seconds - seconds)
        fits = self.step + int(0.97 * left * steps_done / max(seconds, 1e-9))
        planned = max(self.step, min(self.cfg.train.steps, fits))
        if planned != self.planned_steps:
            LOGGER.info("time limit %.1f min: %d steps in %.0f s, planning %d steps in all", limit_seconds / 60,
                        steps_done, seconds, planned)
        self.planned_steps = planned

    # -- export ----------------------------------------------------------------------------------------------
    def final_network(self) -> nn.Module:
        return (self.ema.shadow if self.ema else self.network).to("cpu").eval()

    def export(self, path: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
        """Write the EMA network as a model folder (card with data summary; metrics from ``evaluate``)."""
        from models.folder import ModelCard, save_model_folder

        cfg = self.cfg
        from training.modalities import recipe_for

        recipe = recipe_for(cfg.noise.kind)
        noise = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg.noise).items() if v is not None}
        if cfg.data.pairs == "self-supervised":
            noise = {"kind": "self-supervised", "method": cfg.data.self_supervised}
        elif recipe is not None and hasattr(recipe, "card_noise"):
            # The recipe's own simulation, not the CT projection settings [noise] also holds.
            noise = {"kind": cfg.noise.kind, **recipe.card_noise(cfg)}
        modalities = [cfg.modality] if cfg.modality != "XR" else ["CR", "DX"]
        if recipe is not None and hasattr(recipe, "card_modalities"):  # e.g. endoscopy: ES, XC, OT
            modalities = recipe.card_modalities(cfg)
        network = self.final_network()
        # The card says what the network takes: samples per pixel (its output channels) and neighbouring frames.
        samples = int(getattr(network, "out_channels", 1))
        context = (int(getattr(network, "in_channels", samples)) // samples - 1) // 2
        card = ModelCard(
            name=cfg.name, version=cfg.version, architecture=cfg.model.architecture,
            arguments=dict(cfg.model.arguments), modalities=modalities,
            samples_per_pixel=samples, context=context,
            body_parts=list(cfg.body_parts), normalization=normalization_for(cfg),
            noise=noise, description=cfg.description,
            training={"mode": cfg.mode, "steps": self.step, "patch": cfg.data.patch, "batch": cfg.data.batch,
                      "device": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"),
                      **({"time_limit_minutes": cfg.train.time_limit_minutes} if cfg.train.time_limit_minutes
                         else {}),
                      "loss": cfg.train.loss, **{k: v for k, v in self.data_summary.items() if v is not None},
                      "command": f"python -m training {_relative(cfg.source) if cfg.source else 'CONFIG'}"},
            metrics=metrics or {},
            # e.g. ultrasound: the strengths a site may set (speckle is anatomy-like; full strength can erase it)
            strength_range=(recipe.card_strength_range(cfg) if recipe is not None
                            and hasattr(recipe, "card_strength_range") else None),
        )
        save_model_folder(network, card, path)
        self.network.to(self.device)
        return Path(path)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def train(cfg: TrainingConfig, run_dir: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = True, stop_after: int | None = None) -> RunResult:
    """Train ``cfg`` in ``run_dir`` (default ``runs/<name>``) and export the model folder at the end."""
    run_dir = Path(run_dir) if run_dir else Path("runs") / cfg.name
    return Trainer(cfg, run_dir, resume=resume, progress=progress, stop_after=stop_after).run()
