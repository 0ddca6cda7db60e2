"""``distill-pl``: LightningCLI for fit/validate/test/predict, plus ``sample``, ``evaluate``,
``export`` and ``estimate-memory``.

Every output of a fit/validate/test/predict run lies in its run folder,
``trainer.default_root_dir`` (see :mod:`distill_pl.cli.run_folder`). Errors print one or two
lines (see :mod:`distill_pl.cli.errors`; ``--debug`` for the full traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from distill_pl.training.checkpoint_io import TRAINER_DEFAULTS
from distill_pl.cli.errors import ShortErrors, debug_requested, run_with_short_errors, without_debug_flag
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.cli.harmless_messages import silence_harmless_messages
from distill_pl.cli.settings import check_model_settings
from distill_pl.cli.moved_paths import check_moved_class_paths, new_class_path
from distill_pl.cli.run_folder import (
    RunRelativePaths,
    check_export_free,
    check_run_folder_writable,
    derive_run_paths,
    without_run_outputs,
)
from distill_pl.training.resume import resolve_ckpt_path
from distill_pl.util.checkpoint_files import check_checkpoint, check_lightning_checkpoint, load_error

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
#: ``--ckpt_path`` values that Lightning resolves itself (not files)
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")

silence_harmless_messages()
OTHER_COMMANDS = {
    "sample": "distill_pl.eval.sample:main",
    "evaluate": "distill_pl.eval.evaluate:main",
    "estimate-memory": "distill_pl.scale.memory_estimate:main",
    "export": "distill_pl.export.checkpoint:main",
}
COMMAND_HELP = {
    "fit": "train a stage (teacher, KD, DMD2): distill-pl fit --config configs/tiny/kd.yaml",
    "validate": "run a stage's validation",
    "test": "run a stage's test loop",
    "predict": "generate KD pairs: distill-pl predict --config configs/tiny/kd_pairs.yaml",
    "sample": "N-step CFG samples of a teacher folder on validation clips",
    "evaluate": "the evaluation report: distill-pl evaluate --config configs/tiny/eval.yaml",
    "export": "a KD/DMD2 checkpoint's student as a diffusers folder",
    "estimate-memory": "GPU memory per device of a KD/DMD2 step of a config",
}


def usage() -> str:
    """The top-level help: every subcommand."""
    width = max(map(len, COMMAND_HELP))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMAND_HELP.items()]
    return ("usage: distill-pl COMMAND [options]   (distill-pl COMMAND --help for its options)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n"
            "options of every command: --debug (or DISTILL_PL_DEBUG=1) prints full errors and tracebacks\n")


class CLIParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser with one-line errors."""


class DistillCLI(LightningCLI):
    """Models are chosen by ``class_path`` (one LightningModule per stage); the data is the
    shared VideoDataModule, configured flat under ``data:``. Output paths the config leaves
    unset derive from the run folder; the videos of clips-mode data are checked before any
    model loads."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--overwrite_export", type=bool, default=False,
                            help="fit: replace an exported model already in the export folder")

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :mod:`distill_pl.callbacks.console`'s progress bar and summary in
        place of Lightning's defaults (unless turned off or configured)."""
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar
        from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

        from distill_pl.callbacks.console import ParameterSummary, StepProgressBar

        config = self._get(self.config_init, "trainer", default={})
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        defaults = [RunRelativePaths()]  # checkpoints store the run's output paths relative to it
        if (_RICH_AVAILABLE and config.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in configured)):
            defaults.append(StepProgressBar())
        summary = {}
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in configured):
            defaults.append(ParameterSummary())
            summary = {"enable_model_summary": False}  # Lightning's default summary stays out
        return self._instantiate_trainer({**config, **kwargs, **summary, "callbacks": [*configured, *defaults]},
                                         [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys])

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        derive_run_paths(config, self.subcommand)
        if self.subcommand is None:  # parsed for a benchmark or a test: nothing runs
            return
        check_model_settings(config)  # before any model loads
        check_run_folder_writable(config)
        if self.subcommand == "fit":
            check_export_free(config, config.get("overwrite_export", False))
        data = VideoDataModule(**config.data.as_dict())
        if data.reads_clips(self.subcommand):
            data.check_video_lengths()
        data.check_settings(self.subcommand)  # warnings: batch size, captions

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``; refuse a checkpoint of another stage before
        LightningCLI would silently swap the model class to the checkpoint's (a KD checkpoint
        starts DMD2 through ``init_from``); then, as LightningCLI does, let the checkpoint's
        hyperparameters update the model's config. A checkpoint written before the package was
        regrouped names its class by the old path: the new one is used. The run's output paths
        (``export_dir``) are the current config's, not the checkpoint's (see
        :mod:`distill_pl.cli.run_folder`)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        derive_run_paths(self.config[sub], sub)  # the checkpoint folder "last" is looked for in
        resolve_ckpt_path(self.config[sub])  # "last": the newest intact checkpoint (distill_pl.training.resume)
        ckpt = self.config[sub].get("ckpt_path")
        if not ckpt or str(ckpt) in LIGHTNING_CKPT_NAMES or str(ckpt).startswith("registry") or "://" in str(ckpt):
            return  # Lightning's own names and remote paths: Lightning resolves them
        check_checkpoint(ckpt)  # one line naming a missing, torn or foreign file, before torch.load
        if not Path(ckpt).is_file():
            return
        try:
            checkpoint = torch.load(ckpt, weights_only=True, map_location="cpu")
        except Exception as err:  # torn contents: torch's pickle, zip or storage errors
            raise load_error(Path(ckpt), err) from None
        check_lightning_checkpoint(checkpoint, Path(ckpt), key="global_step")
        hparams = checkpoint.get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        # the run's output paths: the current config's (its run folder), not the checkpoint's
        hparams = without_run_outputs(hparams)
        if not hparams:
            return
        written_by = hparams.pop("_class_path", None)
        if written_by:
            written_by = new_class_path(written_by)
            wanted = (self.config[sub].get("model") or {}).get("class_path")
            if wanted and written_by != wanted:
                sys.exit(
                    f"distill-pl: --ckpt_path {ckpt} was written by {written_by}, but this config "
                    f"trains {wanted}. --ckpt_path only resumes a run of the same stage; to start "
                    f"from that checkpoint's student use the model's init argument "
                    f"(DMD2: --model.init_from {ckpt})."
                )
            hparams = {"class_path": written_by, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise


def benchmark_cli(config: str, max_steps: int, device: str = "cpu", extra_args: tuple[str, ...] = ()) -> DistillCLI:
    """Model, data and trainer of ``config`` as ``distill-pl fit`` builds them, not run, and
    without validation, logging, checkpoints, callbacks, progress bar or export (benchmarks)."""
    args = ["--config", config, f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "--trainer.devices=1",
            "--model.init_args.export_dir=null", *extra_args]
    return DistillCLI(model_class=None, datamodule_class=VideoDataModule, subclass_mode_model=True,
                      run=False, save_config_callback=None, parser_class=CLIParser, args=args)


def lightning_main(args: list[str] | None = None) -> DistillCLI:
    check_moved_class_paths(sys.argv[1:] if args is None else args)
    return DistillCLI(
        model_class=None,
        datamodule_class=VideoDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_class=CLIParser,
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    explicit = argv is not None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    argv = without_debug_flag(argv)
    if not explicit:  # LightningCLI (and its DDP launcher) read sys.argv
        sys.argv[1:] = argv
    ShortErrors.debug, ShortErrors.argv = debug, argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        sys.exit(0 if argv else 2)
    name = f"distill-pl {argv[0]}"
    if argv[0] in OTHER_COMMANDS:
        module, _, func = OTHER_COMMANDS[argv[0]].partition(":")
        command = getattr(__import__(module, fromlist=[func]), func)
        run_with_short_errors(lambda: command(argv[1:]), name, debug)
        return
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMAND_HELP), n=1)
        sys.stderr.write(f"distill-pl: error: unknown command {argv[0]!r}"
                         + (f"; did you mean {close[0]}?" if close else "") + "\n")
        sys.stderr.write(f"(commands: {', '.join(COMMAND_HELP)})\n")
        sys.exit(2)
    run_with_short_errors(lambda: lightning_main(argv if explicit else None), name, debug)


if __name__ == "__main__":
    main()
