"""What a run prints: a progress bar and a model summary without meaningless numbers.

- :class:`StepProgressBar`: Lightning's rich bar, labelled "Epoch 7" instead of "Epoch 7/-2"
  in step-based runs (``max_steps`` set, so ``max_epochs`` is -1).
- :class:`ParameterSummary`: Lightning's summary table without the FLOPs column and total,
  which are 0 because the modules have no ``example_input_array``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class ParameterSummary(ModelSummary):
    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        columns = [(name, [str(v) for v in values]) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *map(len, values)]) for name, values in columns]
        lines = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths))]
        lines.append("-" * len(lines[0]))
        for row in zip(*(values for _, values in columns)):
            lines.append(" | ".join(f"{v:<{w}}" for v, w in zip(row, widths)))
        lines.append("-" * len(lines[0]))
        lines.append(f"{get_human_readable_count(trainable_parameters)} trainable params, "
                     f"{get_human_readable_count(total_parameters - trainable_parameters)} frozen, "
                     f"{model_size:,.1f} MB; modules: {total_training_modes['train']} in train mode, "
                     f"{total_training_modes['eval']} in eval mode (frozen networks)")
        rank_zero_info("\n".join(lines))
