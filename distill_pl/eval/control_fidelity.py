"""Control fidelity: how closely a generated video follows the control it was made from, one
measure per control modality (the data setting ``control``, :mod:`distill_pl.data.controls`).

- ``edge`` -> ``edge_f1``: F1 of the canny edges of the generated video (the data's canny
  thresholds) against the control's edges, a pixel counting as matched within
  ``edge_tolerance`` pixels (:func:`~distill_pl.eval.metrics.edge_f1`). In [0, 1], higher is
  closer.
- ``blur`` -> ``blur_psnr``: PSNR in dB (data range 2, videos in [-1, 1]) of the blur of the
  generated video (the filter that made the control,
  :func:`~distill_pl.data.blur_control.blur_control`) against the control: the same transform
  applied to both sides (the real clip itself scores infinity). Higher is closer.
- ``video`` (a precomputed control named in the manifest: depth, segmentation, ...) ->
  ``control_edge_f1``. The transform that made those control videos (a depth estimator, a
  segmenter) is not part of the project and nothing is downloaded, so the generated video
  cannot be turned into a control to compare. Reported instead: the edge F1 of the canny
  edges of the generated video against the canny edges of the control video (the same
  thresholds and tolerance), i.e. whether the control's structure (depth discontinuities,
  segment boundaries) shows as edges of the video. A proxy for structure, not a depth or
  segmentation accuracy: texture edges of the video that the control lacks lower the
  precision, so a perfect video scores below 1; compare a student's value with the
  teacher's rows of the same report.
- ``clip`` (image-to-video: the control is the clip, its first frame the conditioning image:
  the clip's own or the manifest's ``image``, :mod:`~distill_pl.data.condition_images`)
  -> ``image_psnr``: PSNR in dB (data range 2) of the generated video's given frames (the
  first, :attr:`~distill_pl.data.controls.ControlSettings.given_frames`) against the image.
  The model is handed that frame, so this is the conditioning-frame agreement, reported apart:
  every other metric of the evaluation leaves the given frames out. Higher is closer (a model
  that keeps the frame clean scores the autoencoder's round trip).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distill_pl.data.blur_control import blur_control
from distill_pl.data.control import canny_control
from distill_pl.data.controls import ControlSettings
from distill_pl.eval import metrics


@dataclass(frozen=True)
class ControlFidelity:
    """The fidelity measure of one control setting (see the module docstring); ``tolerance``:
    the pixel tolerance of the edge F1 measures."""

    controls: ControlSettings
    tolerance: int = 1

    @property
    def key(self) -> str:
        """The report's column: ``edge_f1``, ``blur_psnr``, ``control_edge_f1`` or ``image_psnr``."""
        return {"edge": "edge_f1", "blur": "blur_psnr", "video": "control_edge_f1",
                "clip": "image_psnr"}[self.controls.control]

    def describe(self) -> dict:
        """What ``report.json`` records under ``settings.control_fidelity``: the modality
        (``control``), the row ``key``, a column ``title``, its ``digits``, whether higher is
        closer and the ``definition``."""
        c = self.controls
        canny = f"canny thresholds [{c.canny_low:g}, {c.canny_high:g}], matched within {self.tolerance} px"
        described = {
            "edge": ("edge F1", 3, f"F1 of the canny edges of the generated video against the control edges ({canny})"),
            "blur": ("blur PSNR (dB)", 2, "PSNR (data range 2) of the blur of the generated video (the control's "
                                          "filter) against the control"),
            "video": (f"{c.modality} edge F1", 3,
                      f"F1 of the canny edges of the generated video against the canny edges of the {c.modality} "
                      f"control video ({canny}): a structure proxy (no {c.modality} model is run on the video); "
                      "texture edges lower it, so compare with the teacher's rows, not with 1"),
            "clip": ("first-frame PSNR vs image (dB)", 2,
                     "PSNR (data range 2) of the generated video's first frame against the conditioning image "
                     "(the clip's first frame, or the image its manifest line names), which the model is given; "
                     "every other column leaves that frame out"),
        }
        title, digits, definition = described[c.control]
        return dict(control=c.modality, key=self.key, title=title, digits=digits, higher_is_better=True,
                    definition=definition)

    def measure(self, generated: Tensor, control: Tensor) -> Tensor:
        """The fidelity of each video ``generated`` [B, 3, T, H, W] in [-1, 1] to its
        ``control`` (same shape, as the data module made it): [B]."""
        c = self.controls
        if c.control == "blur":
            return metrics.psnr_per_video(blur_control(generated.float()), control.float())
        if c.control == "clip":
            given = slice(0, c.given_frames)
            return metrics.psnr_per_video(generated[:, :, given].float(), control[:, :, given].float())
        reference = metrics.edges_from_control(control) if c.control == "edge" else self._edges(control)
        return metrics.edge_f1(self._edges(generated), reference, self.tolerance)

    def _edges(self, video: Tensor) -> Tensor:
        """Bool canny edges [B, T, H, W] of ``video`` [B, 3, T, H, W] (the data's thresholds)."""
        c = self.controls
        return metrics.edges_from_control(canny_control(video.float(), c.canny_low, c.canny_high))
