"""Which control video a clip gets: the data setting ``control`` and its settings.

- ``edge`` (default): canny edges of the clip (:func:`~distill_pl.data.control.canny_control`,
  thresholds ``canny_low`` / ``canny_high``), Cosmos-Transfer2.5's "edge" control;
- ``blur``: the clip blurred (:func:`~distill_pl.data.blur_control.blur_control`),
  Cosmos-Transfer2.5's "vis" control;
- ``clip``: the clip itself, for image-to-video models, whose ``encode_control`` takes its
  first frame as the conditioning image (Wan 2.2 I2V A14B and TI2V); a manifest line may name
  another image, which then replaces that first frame (:mod:`distill_pl.data.condition_images`);
- ``video``: a precomputed control video per clip (e.g. depth or segmentation), named in the
  manifest under ``controls[control_key]`` (:mod:`distill_pl.data.control_videos`).

Every control is a video [3, T, H, W] in [-1, 1] made at the clip's size from the clip's
frame window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from distill_pl.data.blur_control import blur_control
from distill_pl.data.control import canny_control

ControlName = Literal["edge", "blur", "clip", "video"]
CONTROLS = ("edge", "blur", "clip", "video")


@dataclass(frozen=True)
class ControlSettings:
    """The control of a data set: ``control`` (one of :data:`CONTROLS`), the canny thresholds
    (``edge``) and ``control_key`` (``video``: the manifest's ``controls`` key)."""

    control: ControlName = "edge"
    canny_low: float = 0.2
    canny_high: float = 0.4
    control_key: str | None = None

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"unknown data.control {self.control!r} (expected one of {', '.join(CONTROLS)})")
        if (self.control == "video") != (self.control_key is not None):
            raise ValueError(f"data.control_key names the manifest's control videos: set it with control: video "
                             f"only (control={self.control!r}, control_key={self.control_key!r})")

    @property
    def modality(self) -> str:
        """The control's name for people: ``edge``, ``blur``, or the manifest key of the
        control videos (e.g. ``depth``)."""
        return self.control_key if self.control == "video" else self.control

    @property
    def given_frames(self) -> int:
        """Leading pixel frames of the clip the control gives the model as they are: 1 for
        ``clip`` (the image of image-to-video: the clip's first frame or the manifest's
        ``image``), 0 for the others (the
        model generates every frame). The evaluation leaves these frames out of its quality
        metrics and measures them apart."""
        return 1 if self.control == "clip" else 0

    @property
    def computed(self) -> bool:
        """True when the control is computed from the clip (not read from a control video)."""
        return self.control != "video"

    def compute(self, video: Tensor) -> Tensor:
        """The computed control of ``video`` [B?, 3, T, H, W] in [-1, 1]; same shape."""
        if self.control == "edge":
            return canny_control(video, self.canny_low, self.canny_high)
        if self.control == "blur":
            return blur_control(video)
        if self.control == "clip":
            return video
        raise ValueError("control: video is read from the manifest's control videos, not computed from the clip")

    def metadata(self) -> dict:
        """The keys shard metadata records besides the canny thresholds: none for ``edge``
        (shards written before the setting existed are edge shards), else ``control`` and
        ``control_key``."""
        return {} if self.control == "edge" else {"control": self.control, "control_key": self.control_key}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ControlSettings":
        """The settings shard ``metadata`` records (see :meth:`metadata`)."""
        return cls(metadata.get("control", "edge"), metadata["canny_low"], metadata["canny_high"],
                   metadata.get("control_key"))
