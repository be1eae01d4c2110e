"""The napari plugin (exem/napari): manifest, reader of exem outputs, the three widgets end to end, bad input.

Headless: Qt offscreen, napari's ``make_napari_viewer`` fixture and pytest-qt's ``qtbot``. Outputs are made by
exem's own functions (translate_volume, reliability_map, segment_volume) on tiny data.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import inspect  # noqa: E402
import tempfile  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import torch  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from exem.analysis.segment import segment_volume  # noqa: E402
from exem.data.ome import write_ome_zarr  # noqa: E402
from exem.inference.translate import translate_volume  # noqa: E402
from exem.inference.uncertainty import default_uncertainty_path, reliability_map  # noqa: E402
from exem.models import AnisotropicUNet3D  # noqa: E402
from exem.napari.reader import get_reader, output_kind  # noqa: E402
from exem.napari.widgets import ContentGroupsWidget, SegmentWidget, TranslateWidget  # noqa: E402
from tests.segmenters import BandSegmenter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (8, 64, 64)
VOXEL = (40.0, 10.0, 10.0)
KW = {"patch": [4, 32, 32], "batch_size": 4, "num_workers": 0, "progress": False}
WAIT_MS = 60_000


def phantom(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """Smooth blobs, uint8 (Z, Y, X): two clear intensity populations."""
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), (1, 4, 4))
    return np.where(smooth > np.median(smooth), 200, 60).astype(np.uint8) + rng.integers(
        0, 20, shape, np.uint8
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny generator (.pth), an EM segmenter (TorchScript), an ExM OME-Zarr and exem's outputs of them."""
    root = tmp_path_factory.mktemp("napari")
    torch.manual_seed(0)
    generator = AnisotropicUNet3D(widths=(4, 8, 16)).eval()
    torch.save(generator.state_dict(), root / "G_AB_1.pth")
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(BandSegmenter().eval(), torch.rand(1, 1, 4, 16, 16)), root / "seg.pt")
    exm = write_ome_zarr(root / "exm.ome.zarr", phantom(), VOXEL, chunks=(4, 32, 32), levels=1)
    vem = translate_volume(generator, exm, root / "vem.ome.zarr", **KW).output
    # the other OME-Zarr version exem writes (0.4 on Zarr v2 beside the default), where translate_volume has both
    versions = (
        {"ngff_version": "0.4"} if "ngff_version" in inspect.signature(translate_volume).parameters else {}
    )
    vem_other = translate_volume(generator, exm, root / "vem_other.ome.zarr", **versions, **KW).output
    std = reliability_map(generator, exm, default_uncertainty_path(vem), **KW).output
    seg = segment_volume(root / "seg.pt", vem, root / "seg", num_workers=0, progress=False).output
    return {
        "root": root,
        "pth": root / "G_AB_1.pth",
        "seg_model": root / "seg.pt",
        "exm": exm,
        "vem": vem,
        "vem_other": vem_other,
        "std": std,
        "seg": seg,
    }


@pytest.fixture(autouse=True)
def without_opengl(qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Qt has no OpenGL (the offscreen platform without an X server), stub napari's two GL capability
    queries, the only GL calls made while layers are added to a viewer that is never drawn."""
    from qtpy.QtGui import QOpenGLContext

    if QOpenGLContext().create():
        return
    import napari._vispy.canvas
    import napari._vispy.layers.base
    import napari._vispy.layers.image
    import napari._vispy.layers.labels
    import napari._vispy.utils.gl

    stubs = {"get_gl_extensions": lambda: "", "get_max_texture_sizes": lambda: (16384, 2048)}
    for module in (
        napari._vispy.utils.gl,
        napari._vispy.canvas,
        napari._vispy.layers.base,
        napari._vispy.layers.image,
        napari._vispy.layers.labels,
    ):
        for name, stub in stubs.items():
            monkeypatch.setattr(module, name, stub, raising=False)


def wait(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget.error is None, widget.error


def test_manifest_validates_and_is_discoverable() -> None:
    import npe2

    path = resources.files("exem.napari") / "napari.yaml"
    manifest = npe2.PluginManifest.from_file(str(path))
    assert manifest.name == "exem"
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"Translate ExM", "Segment with an EM model", "Content groups preview"}
    pm = npe2.PluginManager()
    pm.discover()
    assert "exem" in {m.name for m in pm.iter_manifests()}  # through the napari.manifest entry point
    from npe2.manifest.utils import import_python_name

    for command in manifest.contributions.commands:  # every command's python_name imports
        assert callable(import_python_name(pm.get_command(command.id).python_name))


def test_reader_opens_exem_outputs_with_their_scale(make_napari_viewer, files) -> None:
    inputs = out = files
    viewer = make_napari_viewer()
    for key in ("vem", "vem_other"):  # OME-Zarr 0.5 (Zarr v3) and 0.4 (Zarr v2)
        (vem,) = viewer.open(str(out[key]), plugin="exem")
        assert vem._type_string == "image" and vem.multiscale and len(vem.data) == 2
        np.testing.assert_allclose(vem.scale, VOXEL)
        assert vem.data[1].shape == (8, 32, 32) and tuple(vem.contrast_limits) == (0, 255)
        assert str(vem.units[0]) == "nanometer" and vem.metadata["exem"]["complete"]
    (std,) = viewer.open(str(out["std"]), plugin="exem")
    assert std.colormap.name == "magma" and std.data[0].dtype == np.float16
    np.testing.assert_allclose(std.scale, VOXEL)
    prob, labels = viewer.open(str(out["seg"]), plugin="exem")
    assert prob._type_string == "image" and labels._type_string == "labels"
    assert labels.name == "seg labels" and labels.data[0].dtype == np.uint32 and labels.multiscale
    np.testing.assert_allclose(labels.scale, VOXEL)
    np.testing.assert_allclose(prob.scale, VOXEL)
    (only,) = viewer.open(str(out["seg"] / "labels"), plugin="exem")
    assert only._type_string == "labels"
    # not exem's: a plain OME-Zarr, a plain folder, a file, a missing path → other readers
    plain = inputs["root"] / "plain"
    plain.mkdir()
    for path in (inputs["exm"], plain, inputs["pth"], inputs["root"] / "missing.zarr"):
        assert get_reader(str(path)) is None and output_kind(path) is None
    assert get_reader(str(out["vem"])) is not None


def test_translate_widget_adds_virtual_em_and_reliability(make_napari_viewer, qtbot, files) -> None:
    inputs = files
    viewer = make_napari_viewer()
    layer = viewer.add_image(phantom(seed=1), name="exm", scale=VOXEL, units=("nm",) * 3)
    _, widget = viewer.window.add_plugin_dock_widget("exem", "Translate ExM")
    assert isinstance(widget, TranslateWidget)
    widget.layer.value = layer
    widget.checkpoint.value = inputs["pth"]
    widget.output.value = inputs["root"] / "widget_vem.ome.zarr"
    widget.patch.value = "4, 32, 32"
    widget.reliability.value = True
    widget.run()
    wait(qtbot, widget)
    vem, std = viewer.layers["widget_vem"], viewer.layers["widget_vem_uncertainty"]
    np.testing.assert_allclose(vem.scale, VOXEL)
    np.testing.assert_allclose(std.scale, VOXEL)
    assert vem.data[0].shape == SHAPE and std.colormap.name == "magma"
    stages = [r.stage for r in widget.reports]
    assert stages[0] == "loading the generator" and "virtual EM" in stages and "reliability map" in stages
    last = [r for r in widget.reports if r.stage == "virtual EM"][-1]
    assert last.done == last.total > 0
    # an error inside the worker (a file that holds no generator) becomes one line and a notification
    widget.checkpoint.value = inputs["seg_model"]
    widget.output.value = inputs["root"] / "never.ome.zarr"
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget.error is not None and str(inputs["seg_model"]) in widget.error and "\n" not in widget.error
    assert not (inputs["root"] / "never.ome.zarr").exists()


def test_segment_widget_adds_probabilities_and_labels(make_napari_viewer, qtbot, files) -> None:
    inputs = out = files
    viewer = make_napari_viewer()
    (vem,) = viewer.open(str(out["vem"]), plugin="exem")  # file-backed: passed to exem by its path
    memory = viewer.add_image(np.asarray(vem.data[0]), name="memory", scale=VOXEL)  # in-memory, pixel units
    widget = SegmentWidget(viewer)
    assert Path(widget.model.value).name == "em_mito.pt"  # the built-in segmenter by default
    widget.model.value = inputs["seg_model"]
    for layer, name in ((vem, "seg_file"), (memory, "memory_segmentation")):
        widget.layer.value = layer
        widget.output.value = (
            inputs["root"] / f"{name}.zarr" if layer is vem else None
        )  # None: a temporary folder
        widget.run()
        wait(qtbot, widget)
        prob, labels = viewer.layers[f"{name} probabilities"], viewer.layers[f"{name} labels"]
        assert labels._type_string == "labels" and prob._type_string == "image"
        np.testing.assert_allclose(labels.scale, VOXEL)
        assert widget.reports[-1].stage == "labels"
    # the in-memory layer's output went to a new folder in the temporary folder (conftest: under pytest's basetemp)
    assert len(list(Path(tempfile.gettempdir()).glob("exem-napari-*/memory_segmentation.zarr"))) == 1
    # the same probabilities whether exem read the file or the layer's copy of it
    a = np.asarray(viewer.layers["seg_file probabilities"].data[0])
    b = np.asarray(viewer.layers["memory_segmentation probabilities"].data[0])
    np.testing.assert_array_equal(a, b)


def test_content_groups_widget_labels_each_voxel(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    exm = phantom(seed=2)
    layer = viewer.add_image(exm, name="exm", scale=VOXEL)
    widget = ContentGroupsWidget(viewer)
    widget.layer.value = layer
    widget.run()
    wait(qtbot, widget)
    groups = viewer.layers["exm content groups"]
    assert groups._type_string == "labels" and groups.data.shape == SHAPE
    np.testing.assert_allclose(groups.scale, VOXEL)
    assert set(np.unique(groups.data)) == {1, 2}
    assert (groups.data[exm > 150] == 2).all() and (
        groups.data[exm < 100] == 1
    ).all()  # bright ↔ bright group
    assert list(groups.features["group"]) == ["dark", "bright"]
    assert widget.status.value.startswith("ExM content groups (fit): dark")
    widget.thresholds.value = "published ExEM"
    widget.run()
    wait(qtbot, widget)
    assert widget.result.source == "published" and widget.result.thresholds == pytest.approx((110 / 255,))


@pytest.mark.parametrize("cls", [TranslateWidget, SegmentWidget, ContentGroupsWidget])
def test_a_2d_layer_is_refused_in_one_line_before_any_work(make_napari_viewer, files, cls) -> None:
    from napari.utils.notifications import notification_manager

    inputs = files
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((64, 48), np.uint8), name="slice")
    widget = cls(viewer)
    widget.layer.value = layer
    if cls is TranslateWidget:
        widget.checkpoint.value = inputs["pth"]
    before = sorted(p.name for p in inputs["root"].iterdir())
    message = "exem: layer 'slice' is 2D (shape (64, 48)); exem works on 3D volumes (Z, Y, X)"
    with pytest.raises(ValueError, match=r"^exem: layer 'slice' is 2D") as err:
        widget.run()
    assert str(err.value) == message and widget.worker is None
    shown = []
    notification_manager.notification_ready.connect(lambda n: shown.append(n.message))
    widget.run_button.clicked.emit()  # the button: a notification, no exception
    assert widget.error == message and message in shown
    assert sorted(p.name for p in inputs["root"].iterdir()) == before


def test_reader_opens_a_multichannel_translation_as_one_layer_per_channel(tmp_path: Path) -> None:
    """exem-translate channel=…: the virtual EM (grey) and the antibody (green, additive) at the same scale."""
    import zarr as _zarr

    from exem.data.ome import write_ome_zarr
    from exem.inference.translate import translate_volume
    from exem.models import AnisotropicUNet3D
    from exem.napari.reader import read_exem

    rng = np.random.default_rng(0)
    sample = np.stack([rng.integers(0, 4000, (6, 32, 32)), rng.integers(0, 200, (6, 32, 32))]).astype(
        np.uint16
    )
    src = write_ome_zarr(
        tmp_path / "sample.ome.zarr",
        sample,
        (40.0, 10.0, 10.0),
        chunks=(6, 32, 32),
        channel_names=("nhs", "ab"),
    )
    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(2, 4)).eval()
    out = translate_volume(
        net, src, tmp_path / "multi.ome.zarr", channel="nhs", patch=(4, 16, 16), intensity_range=(0, 4000),
        progress=False,
    ).output  # fmt: skip
    layers = read_exem(str(out))
    assert [kw["name"] for _, kw, _ in layers] == ["multi virtual_em", "multi ab"]
    assert all(kind == "image" and tuple(kw["scale"]) == (40.0, 10.0, 10.0) for _, kw, kind in layers)
    assert layers[1][1]["colormap"] == "green" and layers[1][1]["blending"] == "additive"
    from napari.layers import Image

    for data, kwargs, _ in layers:  # napari takes the lazy channel views as they are
        assert Image(data, **kwargs).data is not None
    level0 = layers[1][0][0] if layers[1][1].get("multiscale") else layers[1][0]
    assert np.array_equal(level0[(slice(None),) * 3], _zarr.open_group(str(src), mode="r")["0"][1])
