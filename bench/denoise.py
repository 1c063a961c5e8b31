"""Benchmark of the denoising networks and the engine on this machine's CPU (or GPU with --device cuda).

Prints, per network: FLOPs per 512x512 slice, slices/s at batch 1 and at the batch the engine picks, and the
fraction of the hardware's peak that this is, the peak being measured in the same run (a large float32 matmul
and a large channels-last 3x3 convolution; the higher one counts). Then, unless ``--series 0``, times the whole
path (decode, denoise, build and write the derived series) for a synthetic 512x512 CT series with the small CPU
network: the goal is 300 slices in under 2 minutes on a 2-core CPU.

    .venv/bin/python bench/denoise.py                      # all networks, 300-slice end-to-end run
    .venv/bin/python bench/denoise.py --networks unet-res-small --series 50
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.denoise.engine import Engine, choose_batch_size, denoise_series  # noqa: E402
from models.folder import load_model_folder  # noqa: E402
from models.networks import build_network, count_flops, count_parameters  # noqa: E402
from tests.fixtures.images import make_tiny_model, write_series  # noqa: E402

LOGGER = logging.getLogger(__name__)

NETWORKS = ["unet-res-small", "unet-res", "red-cnn", "gan-generator"]


def _time(fn, min_seconds: float, min_runs: int = 2) -> float:
    """Seconds per call of ``fn`` after one warm-up call (at least ``min_runs`` timed calls)."""
    fn()
    runs, start = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < min_seconds:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs


def peak_gflops(device: torch.device, seconds: float) -> dict[str, float]:
    """Measured GFLOP/s of a 2048^3 float32 matmul and of a 64->64 3x3 convolution on 4x64x256x256."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def mm() -> None:
        a @ b
        sync()

    t = _time(mm, seconds)
    out = {"matmul": 2 * 2048**3 / t / 1e9}
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device)
    conv = conv.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # (torch's stubs lack it)
    x = torch.randn(4, 64, 256, 256, device=device).contiguous(memory_format=torch.channels_last)

    def cv() -> None:
        with torch.inference_mode():
            conv(x)
        sync()

    t = _time(cv, seconds)
    out["conv3x3"] = 2 * 4 * 64 * 64 * 9 * 256 * 256 / t / 1e9
    return out


def bench_network(name: str, device: torch.device, seconds: float) -> dict[str, float]:
    # (torch's stubs lack Module.to(memory_format=...), which it has)
    net = build_network(name).to(device).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    flops = count_flops(net)
    batch = choose_batch_size(net, 512, 512, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"params": count_parameters(net), "gflop": flops / 1e9, "batch": batch}
    for label, n in (("b1", 1), ("bN", batch)):
        x = torch.randn(n, 1, 512, 512, device=device).contiguous(memory_format=torch.channels_last)

        def run(x: torch.Tensor = x) -> None:  # bound now: the loop rebinds x
            with torch.inference_mode():
                net(x)
            sync()

        result[label] = n / _time(run, seconds, min_runs=1)
    return result


def bench_bf16(seconds: float) -> tuple[float, float, float]:
    """(max |fp32 rerun - fp32|, max |bf16 - fp32|, bf16 slices/s) of a random-weight unet-res-small."""
    torch.manual_seed(0)
    net = build_network("unet-res-small").eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
        net.tail.weight.normal_(0.0, 0.01)
    x = (torch.rand(1, 1, 512, 512) * 2 - 0.5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = net(x)
        again = net(x)

        def run() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x)

        low = run().float()
        t = _time(run, seconds, min_runs=1)
    return float((again - ref).abs().max()), float((low - ref).abs().max()), 1.0 / t


def bench_series(slices: int, device: torch.device, workdir: Path) -> tuple[float, float]:
    """End-to-end seconds for a synthetic CT series of ``slices`` 512x512 slices with ``unet-res-small``."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 2000, size=(slices, 512, 512)).astype(np.int16)
    write_series(workdir / "in", volume, intercept=-1024.0)
    del volume
    folder = make_tiny_model(workdir / "models", name="bench-small", arguments={}, identity=False)
    engine = Engine(load_model_folder(folder, device))
    start = time.perf_counter()
    result = denoise_series(workdir / "in", engine, workdir / "out")
    seconds = time.perf_counter() - start
    return seconds, result.frames / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="*", default=NETWORKS, help=f"networks to time (default {NETWORKS})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--series", type=int, default=300, help="slices of the end-to-end run (0: skip)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time unet-res-small under CPU bf16 autocast (informative: the engine runs "
                             "float32 on CPUs) and report its largest deviation from float32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    # On a shared machine the peak drifts with other load: measure it before and after the networks and
    # divide by the best of all measurements (a conservative fraction).
    peaks = [peak_gflops(device, args.seconds)]
    print(f"peak before: matmul 2048^3 {peaks[0]['matmul']:.1f} GFLOP/s, conv 3x3 64ch "
          f"{peaks[0]['conv3x3']:.1f} GFLOP/s")
    rows = [(name, bench_network(name, device, args.seconds)) for name in args.networks]
    peaks.append(peak_gflops(device, args.seconds))
    print(f"peak after:  matmul 2048^3 {peaks[1]['matmul']:.1f} GFLOP/s, conv 3x3 64ch "
          f"{peaks[1]['conv3x3']:.1f} GFLOP/s")
    best = max(max(p.values()) for p in peaks)
    print(f"peak used for fractions: {best:.1f} GFLOP/s")
    print(f"{'network':<16} {'params':>9} {'GFLOP/slice':>11} {'b=1 sl/s':>9} {'batch':>5} {'b=N sl/s':>9} "
          f"{'GFLOP/s':>8} {'of peak':>7} {'300 slices':>10}")
    for name, r in rows:
        rate = max(r["b1"], r["bN"])
        achieved = r["gflop"] * rate
        print(f"{name:<16} {r['params'] / 1e6:>8.2f}M {r['gflop']:>11.1f} {r['b1']:>9.3f} {r['batch']:>5d} "
              f"{r['bN']:>9.3f} {achieved:>8.1f} {achieved / best:>7.0%} {300 / rate:>9.0f}s")
    if args.bf16 and device.type == "cpu":
        fp32, bf16, rate = bench_bf16(args.seconds)
        print(f"unet-res-small bf16 autocast (CPU): {rate:.3f} slices/s at batch 1; largest |bf16 - fp32| "
              f"output difference {bf16:.4f} network units = {bf16 * 1000:.1f} HU with the CT cards' scale 1000 "
              f"(float32 rerun differs by {fp32:.2g})")
    if args.series:
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
            seconds, rate = bench_series(args.series, device, Path(tmp))
        print(f"end-to-end unet-res-small, {args.series} x 512x512 CT slices (decode, denoise, write): "
              f"{seconds:.1f} s, {rate:.2f} slices/s; goal 300 slices < 120 s -> "
              f"{300 / rate:.0f} s for 300")
    print(f"load average {os.getloadavg()[0]:.2f} at end (other work on this machine slows every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
