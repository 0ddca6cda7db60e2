"""``student.json``: what a user needs to build an exported student's conditioning without
the project's code: the text encoder (a plain local path) and how the prompt is embedded, and
the control video's recipe (frame sampling, resize and crop, the control modality with its
filter or its source, values and channels).

The values are those the data code uses (:mod:`distill_pl.data.clips`,
:mod:`distill_pl.data.controls`): the settings the run's data module was given plus the
constants of the control code.
"""

from __future__ import annotations

from typing import Mapping

from distill_pl.data.blur_control import BLUR_RECIPE
from distill_pl.data.control import CANNY_KERNEL_SIZE, CANNY_SIGMA, EDGE_THRESHOLD
from distill_pl.models.denoiser import Denoiser
from distill_pl.util.paths import resolve_path

#: the data settings (``VideoDataModule`` arguments) that ``student.json`` records: the
#: text encoder and its padded length, the clip size and frame stride, the canny thresholds
#: (``control`` and ``control_key`` too when the run sets them: a run before they existed is an
#: edge run)
STUDENT_SETTINGS = (
    "text_encoder", "max_text_length", "num_frames", "frame_stride", "height", "width",
    "canny_low", "canny_high",
)


def student_settings(data_hparams: Mapping, student: Denoiser) -> dict:
    """The content of ``student.json``: the :data:`STUDENT_SETTINGS` of ``data_hparams`` (the
    training data module's ``hparams``), ``text_encoder`` resolved to a plain local folder
    (the configured value, e.g. a ``pkg://`` path, kept as ``text_encoder_configured``),
    ``text_embedding`` (how the prompt becomes the embedding), ``control`` (the modality:
    ``"canny"`` for the data setting ``control: edge``, ``"blur"`` or ``"video"``, with
    ``control_key``; None for a student without control), ``control_preprocessing`` (the
    recipe, below) and
    ``control_input`` (how the family takes it) when there is a control, and the student's
    ``adapter_options`` if it has any."""
    from distill_pl.families.registry import text_embedding_recipe

    settings = {key: data_hparams[key] for key in STUDENT_SETTINGS}
    configured = str(settings["text_encoder"])
    settings["text_encoder"] = str(resolve_path(configured).resolve())
    settings["text_encoder_configured"] = configured
    settings["text_embedding"] = text_embedding_recipe(settings["text_encoder"])
    modality = data_hparams.get("control") or "edge"
    settings["control"] = ("canny" if modality == "edge" else modality) if student.control_channels else None
    if student.control_channels and modality == "video":
        settings["control_key"] = data_hparams["control_key"]
    if student.control_channels:
        settings["control_preprocessing"] = control_preprocessing(data_hparams)
        described = type(student).__dict__.get("control_input")
        if described:
            settings["control_input"] = described
    if student.adapter_options:
        settings["adapter_options"] = student.adapter_options
    return settings


def control_preprocessing(data_hparams: Mapping) -> dict:
    """The control recipe of :class:`~distill_pl.data.clips.ClipDataset` with this run's
    values: the frame window and resize (the clip's and the control's), then ``canny``
    (:func:`~distill_pl.data.control.canny_control`), ``blur``
    (:func:`~distill_pl.data.blur_control.blur_control`), ``clip`` (the clip itself) or
    ``video`` (the manifest's control video, :mod:`distill_pl.data.control_videos`)."""
    modality = data_hparams.get("control") or "edge"
    num_frames, stride = int(data_hparams["num_frames"]), int(data_hparams["frame_stride"])
    height, width = int(data_hparams["height"]), int(data_hparams["width"])
    recipe = {
        "frames": {
            "num_frames": num_frames,
            "frame_stride": stride,
            "indices": f"start + {stride} * k for k in 0..{num_frames - 1} (any start; the "
                       f"window spans {(num_frames - 1) * stride + 1} source frames)",
        },
        "resize": {
            "height": height,
            "width": width,
            "input": "the decoded uint8 RGB frames as float32 [T, 3, H0, W0] in 0..255",
            "scale": "max(height / H0, width / W0)",
            "size": "(max(height, round(H0 * scale)), max(width, round(W0 * scale))); frames "
                    "already height x width are not resized",
            "interpolation": "torch.nn.functional.interpolate(mode='bilinear', antialias=True, "
                             "align_corners=False)",
            "crop": "center: top = (H - height) // 2, left = (W - width) // 2",
            "to_range": "x / 127.5 - 1, clamped to [-1, 1]",
        },
    }
    if modality == "blur":
        return {**recipe, "blur": BLUR_RECIPE, "values": "[-1, 1]", "channels": 3,
                "layout": "[B, 3, T, H, W]: each RGB frame blurred"}
    if modality == "clip":
        return {**recipe, "values": "[-1, 1]", "channels": 3,
                "layout": "[B, 3, T, H, W]: the clip itself (image-to-video: its first frame is the image)"}
    if modality == "video":
        return {**recipe, "video": {
            "key": data_hparams["control_key"],
            "source": "the video the manifest names under controls[key]: the clip's frame count, size and fps",
            "frames": "the clip's indices, resized and cropped like the clip",
        }, "values": "[-1, 1]", "channels": 3, "layout": "[B, 3, T, H, W]: the control video's RGB frames"}
    return {
        **recipe,
        "canny": {
            "grey": "kornia.color.rgb_to_grayscale((frame + 1) / 2), the frame in [0, 1]",
            "function": "kornia.filters.canny",
            "low_threshold": float(data_hparams["canny_low"]),
            "high_threshold": float(data_hparams["canny_high"]),
            "kernel_size": [CANNY_KERNEL_SIZE, CANNY_KERNEL_SIZE],
            "sigma": [CANNY_SIGMA, CANNY_SIGMA],
            "hysteresis": True,
            "edge": f"kornia's edges output > {EDGE_THRESHOLD}",
        },
        "values": {"edge": 1.0, "no_edge": -1.0},
        "channels": 3,
        "layout": "[B, 3, T, H, W]: each frame's edge map replicated to the 3 channels",
    }
