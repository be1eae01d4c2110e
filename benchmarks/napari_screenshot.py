"""The README's napari screenshot (docs/images/napari.png), from a real run of the exem plugin's three widgets.

Nothing is mocked: a trained generator translates the held-out synthetic ExM phantom in the "Translate ExM" widget
(with its reliability map), the built-in EM segmenter (exem/assets/segmenters/em_mito.pt) segments the virtual EM
in the "Segment with an EM model" widget, and the "Content groups preview" widget labels the ExM's intensity
groups. The generator is the demo's (``outputs/demo/latest/checkpoints/last.ckpt``, written by ``make demo``) when
it exists, else one trained here exactly as ``make demo`` trains it (``exem-train experiment=demo``: 160 batches,
about 2½ minutes on 2 CPU cores) into the work folder, with the demo's phantoms (written there too).

napari draws with OpenGL: run it on a desktop, or headless under a virtual X server (Qt's offscreen platform has
no OpenGL; Debian: ``apt-get install xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1``)::

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python benchmarks/napari_screenshot.py

Options: ``--checkpoint`` (any generator exem.load_generator accepts), ``--work-dir`` (outputs; default a new
temporary folder), ``--out`` (the PNG).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "outputs" / "demo" / "latest" / "checkpoints" / "last.ckpt"
WINDOW = (1920, 900)
TIMEOUT_S = 1800


def demo_checkpoint(work: Path) -> Path:
    """The demo's checkpoint, or one trained here as ``make demo`` trains it (``experiment=demo``)."""
    if DEMO_CHECKPOINT.is_file():
        return DEMO_CHECKPOINT
    from exem import compose_config, train

    print(
        f"{DEMO_CHECKPOINT} not found: training the demo model into {work / 'train'} (about 2½ min on 2 cores)"
    )
    cfg = compose_config(
        ["experiment=demo", f"paths.data_dir={work / 'data'}", "callbacks.progress_bar=null"],
        output_dir=work / "train",
    )
    result = train(cfg)
    print(result.summary())
    assert result.last_checkpoint is not None
    return result.last_checkpoint


def settle(seconds: float = 0.5) -> None:
    """Let Qt lay out and draw (the window, docks and canvas) before the view is set or grabbed."""
    from qtpy.QtWidgets import QApplication

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        QApplication.instance().processEvents()
        time.sleep(0.02)


def wait(widget, what: str) -> None:
    """Run the Qt event loop until the widget's worker is done; stop on its error."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    t0 = time.monotonic()
    while widget.busy:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > TIMEOUT_S:
            sys.exit(f"{what}: still running after {TIMEOUT_S} s")
    if widget.error:
        sys.exit(f"{what} failed: {widget.error}")
    print(f"{what}: {widget.status.value} ({time.monotonic() - t0:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="generator (default: the demo's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="outputs (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "napari.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="exem-napari-screenshot-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or demo_checkpoint(work)

    import napari
    from PIL import Image

    from exem.data.synthetic import write_synthetic_dataset
    from exem.data.volume import open_volume

    # the demo's held-out test phantom (the training's data folder, reused when it was written there)
    data = write_synthetic_dataset(work / "data" / "synthetic", shape=(32, 192, 192))
    exm = open_volume(data["exm_test"], percentiles=[0.5, 99.8])  # the demo's ExM normalisation
    raw = exm.read((slice(None),) * 3)
    lo, hi = exm.intensity_range
    viewer = napari.Viewer(title="exem: ExM → virtual EM", show=True)
    viewer.window.resize(*WINDOW)
    viewer.add_image(
        raw,
        name="ExM (synthetic)",
        scale=exm.voxel_size_nm,
        units=("nm",) * 3,
        contrast_limits=(float(lo), float(hi)),
    )

    _, groups = viewer.window.add_plugin_dock_widget("exem", "Content groups preview")
    groups.percentiles.value = "0.5, 99.8"  # the demo's ExM normalisation
    groups.run()
    wait(groups, "content groups")

    _, translate = viewer.window.add_plugin_dock_widget("exem", "Translate ExM")
    translate.layer.value = viewer.layers["ExM (synthetic)"]
    translate.checkpoint.value = checkpoint
    translate.output.value = work / "virtual_em.ome.zarr"
    translate.reliability.value = True
    translate.overwrite.value = True
    translate.run()
    wait(translate, "translate")

    _, segment = viewer.window.add_plugin_dock_widget("exem", "Segment with an EM model")
    segment.layer.value = viewer.layers["virtual_em"]
    segment.output.value = work / "mito.zarr"  # the model: the built-in em_mito.pt, the widget's default
    segment.overwrite.value = True
    segment.run()
    wait(segment, "segment")

    # three tiles of the middle slice: ExM + its content groups | virtual EM + mitochondria | reliability map
    viewer.layers.remove("mito probabilities")
    order = ["ExM (synthetic)", "ExM (synthetic) content groups", "virtual_em", "mito labels"]
    order.append("virtual_em_uncertainty")
    for i, name in enumerate(order):
        viewer.layers.move(viewer.layers.index(name), i)
    viewer.layers["ExM (synthetic) content groups"].opacity = 0.35
    viewer.layers["mito labels"].opacity = 0.6
    viewer.layers["virtual_em_uncertainty"].blending = "translucent"
    canvas = getattr(viewer, "canvas", viewer)  # napari ≥ 0.9: viewer.canvas.grid / .overlays.scale_bar
    grid = canvas.grid
    grid.enabled, grid.stride, grid.shape = True, 2, (1, 3)
    scale_bar = canvas.overlays.scale_bar if hasattr(canvas, "overlays") else viewer.scale_bar
    scale_bar.visible = True
    viewer.dims.set_current_step(0, exm.shape[0] // 2)
    viewer.layers.selection.active = viewer.layers["virtual_em"]
    settle()
    viewer.reset_view()
    settle()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = viewer.screenshot(canvas_only=False, flash=False)  # (H, W, 4) uint8
    # a 256-colour palette PNG: half the bytes of the RGBA one, no visible difference at this content
    palette = (
        Image.fromarray(image)
        .convert("RGB")
        .quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    )
    palette.save(args.out, optimize=True)
    print(f"screenshot: {args.out} (outputs in {work})")
    viewer.close()


if __name__ == "__main__":
    main()
