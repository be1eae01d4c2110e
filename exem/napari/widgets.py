"""The exem dock widgets (npe2 ``widgets``): thin magicgui forms over :mod:`exem.napari.tasks`.

Each widget picks an image layer, checks it (:func:`exem.napari.layers.layer_input`: a 3D volume, else a one-line
``ValueError`` shown as a napari notification, before any work), runs its task in a napari ``thread_worker`` with
block progress (a napari progress bar and the status line), and adds the results as layers: read back from the
outputs with the exem reader (``viewer.open(path, plugin="exem")``), so they carry their voxel size in nm and
their file, or, for the content groups, a labels layer on the ExM layer's grid.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.layers import Image
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils import progress
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from exem.content_groups import ContentFitSettings
from exem.errors import exception_line, user_error, user_error_line
from exem.losses import MAX_GROUPS
from exem.napari.groups import ContentGroupPreview
from exem.napari.layers import LayerInput, layer_input
from exem.napari.tasks import (
    SEGMENT_SUFFIX,
    TRANSLATE_SUFFIX,
    Progress,
    TranslateOutputs,
    default_output,
    run_content_groups,
    run_segment,
    run_translate,
)

__all__ = [
    "ContentGroupsWidget",
    "ExemTaskWidget",
    "SegmentWidget",
    "TaskFailed",
    "TranslateWidget",
    "error_line",
]

log = logging.getLogger(__name__)

PLUGIN = "exem"
BUILTIN_SEGMENTER = "em_mito.pt"
THRESHOLD_SOURCES = ("fit to the layer", "checkpoint", "published ExEM")


def error_line(exc: BaseException) -> str:
    """The one line a user reads for ``exc`` (the user error in its chain, else the exception with its type)."""
    found = user_error(exc)
    return user_error_line(found) if found is not None else exception_line(exc, with_type=True)


def parse_numbers(text: str, what: str, count: int, kind: Callable[[str], Any]) -> tuple[Any, ...] | None:
    """``"8, 32, 32"`` → ``(8, 32, 32)``; empty → None.

    Raises:
        ValueError: not ``count`` numbers (one line).
    """
    text = (text or "").strip().strip("[]()")
    if not text:
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"exem: {what} must be {count} numbers separated by commas, got {text!r}")
    return values


def existing_path(value: Any, what: str, kinds: str) -> Path:
    """``value`` as an existing path.

    Raises:
        ValueError: empty or missing (one line naming ``what`` and the ``kinds`` it may be).
    """
    if value is None or str(value) in ("", "."):
        raise ValueError(f"exem: choose a {what} ({kinds})")
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"exem: {what} {path} does not exist")
    return path


@dataclass(frozen=True)
class TaskFailed:
    """What a task raised, returned by the worker instead of raised (napari's worker error hooks are not used)."""

    error: BaseException


def _caught(task: Callable[..., Any], **kwargs: Any) -> Any:
    """``task(**kwargs)``, or :class:`TaskFailed` with its exception (worker thread)."""
    try:
        return task(**kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the user as one line
        return TaskFailed(exc)


class _Reporter(QObject):
    """Carries :class:`~exem.napari.tasks.Progress` from the worker's thread to the main thread (queued)."""

    progressed = Signal(object)


class ExemTaskWidget(Container):
    """A form that runs one exem task on an image layer in a worker thread.

    Subclasses add their fields, :meth:`prepare` (check the fields, return the task) and :meth:`show_result`.

    Attributes:
        viewer: the napari viewer.
        busy: a task is running.
        worker: the last worker started.
        result: the last task's result (None until one succeeded).
        error: the last error's line (None when the last run succeeded).
        reports: the :class:`~exem.napari.tasks.Progress` values of the last run, in order.
    """

    title = "exem"
    layer_label = "layer"

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.layer = ComboBox(label=self.layer_label, choices=self._image_layers)
        self.run_button = PushButton(text=self.title)
        self.status = Label(value="")
        self.busy = False
        self.worker: FunctionWorker | None = None
        self.result: Any = None
        self.error: str | None = None
        self.reports: list[Progress] = []
        self._bar: progress | None = None
        self._reporter = _Reporter()
        self._reporter.progressed.connect(self._on_progress)
        self.append(self.layer)
        self.add_fields()
        self.extend([self.run_button, self.status])
        self.run_button.changed.connect(self._clicked)
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh_layers)

    # ----- for subclasses
    def add_fields(self) -> None:
        """Append the task's own fields."""

    def prepare(self, layer: LayerInput) -> Callable[..., Any]:
        """Check the fields; return the task, called in the worker as ``task(report=...)``."""
        raise NotImplementedError

    def show_result(self, result: Any) -> None:
        """Add the result's layers (main thread)."""

    # ----- running
    def _image_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_layers(self, _event: Any = None) -> None:
        try:
            self.layer.reset_choices()
        except RuntimeError:  # the widget's Qt object is gone (dock closed) while the viewer lives on
            log.debug("%s: layer list changed after the widget was closed", self.title)

    def run(self) -> FunctionWorker:
        """Check the layer and the fields, then start the task in a worker thread.

        Raises:
            ValueError: the layer is not a 3D volume, or a field is wrong (one line; nothing is written).
        """
        if self.busy:
            raise ValueError(f"exem: {self.title} is already running")
        task = self.prepare(layer_input(self.layer.value))
        self.error, self.result, self.reports = None, None, []
        worker = create_worker(
            _caught,
            task,
            report=self._reporter.progressed.emit,
            _connect={"returned": self._on_returned, "errored": self._fail, "finished": self._on_finished},
            _start_thread=False,
        )
        self._bar = progress(total=0, desc=self.title)
        self.busy, self.worker = True, worker
        self.run_button.enabled = False
        self.status.value = f"{self.title}…"
        worker.start()
        return worker

    def _clicked(self, *_: Any) -> None:
        try:
            self.run()
        except (ValueError, OSError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        line = error_line(exc)
        self.error = line
        self.status.value = line
        if user_error(exc) is None:  # not the user's to fix: keep the traceback in the log
            log.error("%s: %s", self.title, line, exc_info=exc)
        else:
            log.warning("%s: %s", self.title, line)
        show_error(line)

    def _on_progress(self, step: Progress) -> None:
        self.reports.append(step)
        self.status.value = step.text
        bar = self._bar
        if bar is None:  # a report delivered after the run ended
            return
        bar.set_description(step.stage)
        if step.total:
            bar.total = step.total
            bar.n = step.done
        bar.refresh()

    def _on_returned(self, result: Any) -> None:
        if isinstance(result, TaskFailed):
            self._fail(result.error)
            return
        self.result = result
        try:
            self.show_result(result)
        except Exception as exc:  # noqa: BLE001 - any failure to show the result is reported, not raised in Qt
            self._fail(exc)

    def _on_finished(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.run_button.enabled = True
        self.busy = False


class TranslateWidget(ExemTaskWidget):
    """Translate an ExM layer to virtual EM with a trained generator (:func:`exem.translate_volume`), optionally
    with its reliability map (:func:`exem.reliability_map`); the outputs open as layers (nm scale)."""

    title = "Translate ExM"
    layer_label = "ExM layer"

    def add_fields(self) -> None:
        self.checkpoint = FileEdit(
            label="checkpoint", mode="r", nullable=True, filter="*.ckpt *.pth *.pt *.safetensors"
        )
        self.output = FileEdit(label="output (empty: automatic)", mode="w", nullable=True)
        self.patch = LineEdit(label="patch z, y, x", value="")
        self.overlap = LineEdit(label="overlap z, y, x", value="")
        self.reliability = CheckBox(text="reliability map", value=False)
        self.overwrite = CheckBox(text="overwrite", value=False)
        self.extend(
            [self.checkpoint, self.output, self.patch, self.overlap, self.reliability, self.overwrite]
        )

    def prepare(self, layer: LayerInput) -> Callable[..., TranslateOutputs]:
        patch = parse_numbers(self.patch.value, "patch", 3, int)
        overlap = parse_numbers(self.overlap.value, "overlap", 3, int)
        checkpoint = existing_path(
            self.checkpoint.value, "checkpoint", ".ckpt, .pth, or an exported generator folder"
        )
        output = self.output.value or default_output(layer, TRANSLATE_SUFFIX)
        return functools.partial(
            run_translate,
            layer,
            checkpoint,
            output,
            reliability=bool(self.reliability.value),
            patch=patch,
            overlap=overlap,
            overwrite=bool(self.overwrite.value),
        )

    def show_result(self, result: TranslateOutputs) -> None:
        for path in result.paths:
            self.viewer.open(str(path), plugin=PLUGIN)
        self.status.value = f"virtual EM: {result.virtual_em.output}"


class SegmentWidget(ExemTaskWidget):
    """Segment a (virtual) EM layer with an EM-trained model (:func:`exem.segment_volume`); the probabilities and
    labels open as layers (nm scale). The model defaults to exem's built-in mitochondria segmenter."""

    title = "Segment with an EM model"
    layer_label = "EM layer"

    def add_fields(self) -> None:
        builtin = resources.files("exem.assets.segmenters") / BUILTIN_SEGMENTER
        self.model = FileEdit(
            label="model", mode="r", nullable=True, filter="*.pt *.ts *.onnx *.zip", value=str(builtin)
        )
        self.output = FileEdit(label="output (empty: automatic)", mode="w", nullable=True)
        self.overwrite = CheckBox(text="overwrite", value=False)
        self.extend([self.model, self.output, self.overwrite])

    def prepare(self, layer: LayerInput) -> Callable[..., Any]:
        model = existing_path(
            self.model.value, "model", "TorchScript .pt, ONNX .onnx, or a bioimage.io package"
        )
        output = self.output.value or default_output(layer, SEGMENT_SUFFIX)
        return functools.partial(run_segment, layer, model, output, overwrite=bool(self.overwrite.value))

    def show_result(self, result: Any) -> None:
        self.viewer.open(str(result.output), plugin=PLUGIN)
        self.status.value = f"{result.num_objects} objects: {result.output}"


class ContentGroupsWidget(ExemTaskWidget):
    """Show an ExM layer's content-loss intensity groups (the strongest group of each voxel) as a labels layer,
    with thresholds fitted to the layer as training fits them, a checkpoint's, or the published ones."""

    title = "Content groups preview"
    layer_label = "ExM layer"

    def add_fields(self) -> None:
        self.thresholds = ComboBox(
            label="thresholds", choices=list(THRESHOLD_SOURCES), value=THRESHOLD_SOURCES[0]
        )
        self.groups = SpinBox(label="groups", min=2, max=MAX_GROUPS, value=ContentFitSettings().lm_groups)
        self.checkpoint = FileEdit(
            label="checkpoint", mode="r", nullable=True, filter="*.ckpt *.pth *.pt *.safetensors"
        )
        self.percentiles = LineEdit(label="percentiles lo, hi (empty: dtype range)", value="")
        self.extend([self.thresholds, self.groups, self.checkpoint, self.percentiles])

    def prepare(self, layer: LayerInput) -> Callable[..., ContentGroupPreview]:
        source = self.thresholds.value
        checkpoint = None
        if source == "checkpoint":
            checkpoint = existing_path(
                self.checkpoint.value, "checkpoint", ".ckpt, or an exported generator folder"
            )
        percentiles = parse_numbers(self.percentiles.value, "percentiles", 2, float)
        self._grid = {
            "scale": tuple(self.layer.value.scale)[-3:],
            "translate": tuple(self.layer.value.translate)[-3:],
            "units": tuple(self.layer.value.units)[-3:],
            "name": f"{layer.name} content groups",
        }
        return functools.partial(
            run_content_groups,
            layer,
            checkpoint=checkpoint,
            groups=int(self.groups.value),
            percentiles=percentiles,
            published=source == "published ExEM",
        )

    def show_result(self, result: ContentGroupPreview) -> None:
        grid = dict(self._grid)
        colormap = DirectLabelColormap(color_dict=result.colours())
        self.viewer.add_labels(
            result.labels, features=result.features(), colormap=colormap, opacity=0.5, **grid
        )
        self.status.value = result.describe()
        log.info("%s", result.describe())
