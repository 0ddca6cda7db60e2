"""``distill-pl``: LightningCLI for fit/validate/test/predict, plus ``distill-pl sample``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from distill_pl.checkpoint_io import TRAINER_DEFAULTS
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.resume import resolve_ckpt_path

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# DMD2 uses manual optimization with one optimizer step per training step, so a checkpoint
# taken after a step holds exactly the state the next step starts from (exact resume is
# tested); Lightning's generic warning about pre-optimization states does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
OTHER_COMMANDS = {
    "sample": "distill_pl.sample:main",
    "evaluate": "distill_pl.eval.evaluate:main",
    "estimate-memory": "distill_pl.memory_estimate:main",
    "export": "distill_pl.export:main",
}


class DistillCLI(LightningCLI):
    """Models are chosen by ``class_path`` (one LightningModule per stage); the data is the
    shared VideoDataModule, configured flat under ``data:``."""

    def _parse_ckpt_path(self) -> None:
        """Refuse ``--ckpt_path`` from another stage before LightningCLI silently swaps the
        model class to the checkpoint's (a KD checkpoint starts DMD2 through ``init_from``)."""
        sub = self.config.get("subcommand")
        if sub:
            resolve_ckpt_path(self.config[sub])  # "last": the newest intact checkpoint (distill_pl.resume)
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).is_file():
            saved = torch.load(ckpt, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            written_by = saved.get("_class_path")
            wanted = (self.config[sub].get("model") or {}).get("class_path")
            if written_by and wanted and written_by != wanted:
                sys.exit(
                    f"distill-pl: --ckpt_path {ckpt} was written by {written_by}, but this config "
                    f"trains {wanted}. --ckpt_path only resumes a run of the same stage; to start "
                    f"from that checkpoint's student use the model's init argument "
                    f"(DMD2: --model.init_from {ckpt})."
                )
        super()._parse_ckpt_path()


def benchmark_cli(config: str, max_steps: int, device: str = "cpu", extra_args: tuple[str, ...] = ()) -> DistillCLI:
    """Model, data and trainer of ``config`` as ``distill-pl fit`` builds them, not run, and
    without validation, logging, checkpoints, callbacks, progress bar or export (benchmarks)."""
    args = ["--config", config, f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "--trainer.devices=1",
            "--model.init_args.export_dir=null", *extra_args]
    return DistillCLI(model_class=None, datamodule_class=VideoDataModule, subclass_mode_model=True,
                      run=False, save_config_callback=None, args=args)


def lightning_main(args: list[str] | None = None) -> DistillCLI:
    return DistillCLI(
        model_class=None,
        datamodule_class=VideoDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    explicit = argv is not None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OTHER_COMMANDS:
        module, _, func = OTHER_COMMANDS[argv[0]].partition(":")
        getattr(__import__(module, fromlist=[func]), func)(argv[1:])
        return
    if argv and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        sys.exit(
            f"distill-pl: unknown command {argv[0]!r}; expected one of "
            f"{', '.join(LIGHTNING_COMMANDS + tuple(OTHER_COMMANDS))}"
        )
    lightning_main(argv if explicit else None)


if __name__ == "__main__":
    main()
