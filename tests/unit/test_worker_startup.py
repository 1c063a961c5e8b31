"""What the worker does before its first job: allocator tuning and loading the rules' models."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dicom_node.config import Config, ModelSettings, Rule
from dicom_node.denoise.worker import ModelCache
from tests.fixtures.images import make_tiny_model

# Allocates and frees a 96 MB block twice in a fresh thread and prints the page faults of the second time.
_FAULTS_OF_REUSE = textwrap.dedent("""
    import resource, sys, threading
    if sys.argv[1] == "tuned":
        from dicom_node.denoise.cpu_memory import keep_freed_memory
        assert keep_freed_memory()
    result = []
    def run():
        # bytearray: plain malloc + memset (numpy asks for huge pages, which hides the faults being counted)
        del bytearray(96 << 20)[0]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        del bytearray(96 << 20)[0]
        result.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    print(result[0])
""")


def _faults_of_reuse(mode: str) -> int:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_REUSE, mode], cwd=root, capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    # 96 MB is 24,576 pages of 4 KiB: glibc maps and unmaps a block that size each time unless tuned.
    assert _faults_of_reuse("default") > 10_000
    assert _faults_of_reuse("tuned") < 1_000


def test_preload_loads_rule_models_and_reports_missing_ones(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    make_tiny_model(tmp_path, name="tiny-ct")
    cfg = Config(models=ModelSettings(directories=[str(tmp_path)], device="cpu"),
                 rules=[Rule(name="ct", model="tiny-ct"), Rule(name="mr", model="no-such-model"),
                        Rule(name="ct-again", model="tiny-ct")])
    cache = ModelCache(cfg)
    with caplog.at_level(logging.ERROR, logger="dicom_node.denoise.worker"):
        cache.preload(rule.model for rule in cfg.rules)
    assert cache.loaded_names() == ["tiny-ct"]
    assert any("no-such-model cannot be loaded" in r.getMessage() for r in caplog.records)
