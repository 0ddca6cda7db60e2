"""One folder per run: every path a ``distill-pl fit/validate/test/predict`` run writes derives
from ``trainer.default_root_dir`` (the run folder, ``<run>`` below; the working directory
when unset), unless the config names it explicitly:

- ``<run>/checkpoints/``: the ``ModelCheckpoint`` callbacks without a ``dirpath``
  (``last.ckpt`` and the step checkpoints; ``--ckpt_path last`` looks there);
- ``<run>/version_<n>/``: a ``TensorBoardLogger`` (or ``trainer.logger: true``) without a
  ``save_dir``: events, ``config.yaml`` and the frame grids (``grids/``) of launch ``n``;
- ``<run>/export/``: ``model.init_args.export_dir`` of a fit when it is null (the student or
  teacher as a diffusers folder, written at the end of fit);
- ``<run>/{train,val}/``: ``data.pairs_dir`` of a KD pair generation (``predict``, pairs mode)
  or ``data.latents_dir`` of a clip latent precompute (``predict``, latents mode) when it is null (also when a config is only parsed, without a subcommand).

A run whose folder cannot be written (read-only) stops before any model loads, with one line
naming it (:func:`check_run_folder_writable`).

A fit refuses to start when its export folder already holds an export (another run's, or
this run's from an earlier launch) unless ``--overwrite_export true`` is given, or unless it
resumes this run: ``--ckpt_path`` names a checkpoint inside the run folder (``last``: the
newest of ``<run>/checkpoints/``) and the export folder lies inside the run folder too, so
the export there is this run's and the resumed fit writes it again.

A checkpoint stores the model's output paths inside the run folder (``export_dir``) relative
to it (:class:`RunRelativePaths`), and a resume (``--ckpt_path``) never takes them from the
checkpoint (:func:`without_run_outputs`): they come from the current config, derived from the
current run folder or set explicitly. So a copied or moved run folder resumes and exports
inside itself and leaves the original untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback

CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"
TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
LOGGER_CLASSES = (TENSORBOARD_LOGGER, "lightning.pytorch.loggers.CSVLogger")
#: the model's hyperparameters that are output paths of its run
RUN_OUTPUT_HPARAMS = ("export_dir",)
#: checkpoint key: the hyperparameters stored relative to the run folder
RUN_RELATIVE_KEY = "run_relative_hyper_parameters"


class ExportExistsError(FileExistsError):
    """A fit would overwrite an exported model that is already there."""


def run_folder(trainer: Namespace) -> str:
    """The run folder of a parsed ``trainer`` config (Lightning's default: the working directory)."""
    return trainer.get("default_root_dir") or os.getcwd()


def _class_path(spec) -> str | None:
    return spec.get("class_path") if isinstance(spec, (dict, Namespace)) else None


def derive_run_paths(config: Namespace, subcommand: str | None) -> None:
    """Fill the unset output paths of a parsed subcommand config from its run folder, in place
    (``subcommand`` None: a config parsed without running it; no export folder then)."""
    trainer = config.trainer
    root = run_folder(trainer)
    for callback in trainer.get("callbacks") or []:
        if _class_path(callback) == CHECKPOINT_CALLBACK and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = str(Path(root) / "checkpoints")
    logger = trainer.get("logger")
    if logger is True or logger is None:
        trainer.logger = Namespace(class_path=TENSORBOARD_LOGGER, init_args=Namespace(save_dir=root, name=""))
    elif _class_path(logger) in LOGGER_CLASSES and logger.init_args.get("save_dir") is None:
        logger.init_args.save_dir = root
        logger.init_args.name = ""
    model_args = (config.get("model") or Namespace()).get("init_args")
    if subcommand == "fit" and model_args is not None and "export_dir" in model_args and model_args.export_dir is None:
        model_args.export_dir = str(Path(root) / "export")
    data = config.get("data")
    if subcommand in ("predict", None) and data is not None:
        key = {"pairs": "pairs_dir", "latents": "latents_dir"}.get(data.get("mode"))
        if key is not None and data.get(key) is None:
            data[key] = root


def _inside(path: str | Path, folder: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def resumes_own_run(config: Namespace, export_dir: str | Path) -> bool:
    """Whether a fit config resumes its own run: ``ckpt_path`` (already resolved from
    ``last``) and ``export_dir`` both lie inside its run folder."""
    ckpt_path = config.get("ckpt_path")
    root = run_folder(config.get("trainer") or Namespace())
    return bool(ckpt_path) and _inside(ckpt_path, root) and _inside(export_dir, root)


class RunFolderError(OSError):
    """The run folder cannot be written."""


def check_run_folder_writable(config: Namespace) -> None:
    """Raise :class:`RunFolderError` naming the run folder of a parsed subcommand config when
    a file cannot be created in it (or, while it does not exist yet, in the nearest existing
    folder above it, where it would be made). Nothing is left behind."""
    root = Path(run_folder(config.trainer))
    folder = root
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".distill_pl_write_check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if folder == root else f" (it would be made in {folder})"
        error = RunFolderError(f"the run folder {root} is not writable{where}: {err.strerror or err}; "
                               f"give a writable --trainer.default_root_dir")
        error.errno = err.errno
        raise error from None


def check_export_free(config: Namespace, overwrite: bool) -> None:
    """Refuse a fit whose ``export_dir`` already holds files, unless ``overwrite`` or the fit
    resumes the run that wrote them (:func:`resumes_own_run`)."""
    model_args = (config.get("model") or Namespace()).get("init_args") or Namespace()
    export_dir = model_args.get("export_dir")
    if overwrite or not export_dir or not Path(export_dir).is_dir() or not any(Path(export_dir).iterdir()):
        return
    if resumes_own_run(config, export_dir):
        return
    raise ExportExistsError(
        f"{export_dir} already holds an exported model (from an earlier run); give this run its own "
        f"folder (--trainer.default_root_dir), resume the run of that folder (--ckpt_path last) "
        f"or pass --overwrite_export true to replace it"
    )


class RunRelativePaths(Callback):
    """Stores the output paths of :data:`RUN_OUTPUT_HPARAMS` that lie in the run folder
    (``trainer.default_root_dir``) relative to it in every checkpoint's ``hyper_parameters``
    (the model's own ``hparams`` are unchanged), and lists them under :data:`RUN_RELATIVE_KEY`."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, dict):
            return
        root = Path(trainer.default_root_dir).resolve()
        relative = []
        for key in RUN_OUTPUT_HPARAMS:
            value = hparams.get(key)
            if not value:
                continue
            path = Path(value).resolve()
            if path == root or root in path.parents:
                hparams[key] = path.relative_to(root).as_posix()
                relative.append(key)
        checkpoint[RUN_RELATIVE_KEY] = relative


def without_run_outputs(hparams: dict) -> dict:
    """The checkpoint's ``hparams`` for a resume, without the run's output paths
    (:data:`RUN_OUTPUT_HPARAMS`): those come from the current config, derived from the current
    run folder (:func:`derive_run_paths`) or set explicitly, never from the run folder the
    checkpoint was written in."""
    return {k: v for k, v in hparams.items() if k not in RUN_OUTPUT_HPARAMS}
