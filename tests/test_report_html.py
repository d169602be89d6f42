"""report.html and report.md: plots embedded and linked, inputs escaped, and rendered by a real headless browser."""

import base64
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeprune import api
from edgeprune.html_report import html_report
from edgeprune.plots import render_plots
from edgeprune.progress import SILENT
from tests.conftest import FAST, USER_MODEL

CHROMIUM = Path("/usr/bin/chromium")
PLOT_NAMES = ["accuracy", "latency_size", "accuracy_compression", "layers"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_BLUES = ((0x4C, 0x72, 0xB0), (0x1F, 0x77, 0xB4))  # bar colours used only by the plots, never by the page


@pytest.fixture(scope="module")
def built(tmp_path_factory, user_checkpoint) -> Path:
    """A FAST cpu-x86 build with structured and unstructured pruning, so every plot has data."""
    root = tmp_path_factory.mktemp("report")
    overrides = (*FAST, "prune.mode='both'", "sparsity.amount=0.5")
    api.build(
        "cpu-x86",
        model=USER_MODEL,
        weights=str(user_checkpoint),
        overrides=overrides,
        out=root / "out",
        cache_dir=root / "cache",
        reporter=SILENT,
    )
    return root / "out"


@pytest.mark.slow
def test_report_embeds_every_plot_and_loads_nothing_from_outside(built):
    page = (built / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(PLOT_NAMES)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r"(?:src|href)=\"(?!data:)", page) and "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page  # the browser itself refuses anything not inline


@pytest.mark.slow
def test_markdown_report_links_the_plot_files(built):
    text = (built / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", text)
    assert linked == [f"plots/{name}.png" for name in PLOT_NAMES]
    for path in linked:
        assert (built / path).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_everything_from_inputs_is_escaped(built):
    manifest = copy.deepcopy(json.loads((built / "manifest.json").read_text()))
    hostile = '<script>alert("x")</script>'
    manifest["target"] = f"t{hostile}"
    manifest["model"]["channels"][0]["layer"] = hostile
    manifest["stages"][0]["reason"] = f'model.source changed: "{hostile}" & <img src=x onerror=alert(1)>'
    manifest["inputs"]["weights"] = f"/tmp/{hostile}.pt"
    manifest["budgets"]["violations"] = [{"kind": "size", "message": hostile}]
    page = html_report(manifest, render_plots(manifest))
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own plot counter
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert len(re.findall(r"<img ", page)) == len(PLOT_NAMES)


@pytest.mark.slow
def test_headless_chromium_renders_every_plot(built, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (bash scripts/setup.sh installs Debian's chromium as root)")
    url = (built / "report.html").resolve().as_uri()
    dom = run_chromium(tmp_path / "dom-profile", "--dump-dom", url)
    counter = re.search(r'id="plots-rendered" data-rendered="(\d+)" data-total="(\d+)"', dom)
    assert counter, dom[-2000:]
    assert (int(counter[1]), int(counter[2])) == (len(PLOT_NAMES), len(PLOT_NAMES))  # each <img> decoded, naturalWidth > 0

    screenshot = tmp_path / "report.png"
    run_chromium(tmp_path / "shot-profile", f"--screenshot={screenshot}", "--window-size=1200,3000", url)
    pixels = read_png(screenshot)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05  # not a blank page
    rgb = (pixels[..., :3] * 255).round().astype(int)
    plot_pixels = sum(int((np.abs(rgb - np.array(blue)).max(axis=-1) <= 8).sum()) for blue in PLOT_BLUES)
    assert plot_pixels > 5000, f"only {plot_pixels} pixels of plot colour in the screenshot"


def run_chromium(profile: Path, *args: str) -> str:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)
