"""training.ema: an exponential moving average of the weights, evaluated beside the raw weights at every evaluation.

Why not Composer's `composer.algorithms.EMA`: it swaps the EMA weights in for the evaluation *instead of* the raw
ones (so every evaluation would score only one of the two), keeps its copy in the model's dtype, and decides itself
when to swap at checkpoints. rafale wants both scores at each evaluation, in fp32, and an export of either, so this
is a small callback of its own:

- `WeightAverage.batch_end` (after the optimizer step, on every rank, which all hold the same weights under DDP):
  ema = decay * ema + (1 - decay) * weights, in fp32, over the model's parameters. The first use (the fresh run's
  evaluation at batch 0, or the first step) starts it from the weights as they are then.
- The Trainer gets a second evaluator, labelled `eval_ema` (EMA_LABEL), on the same validation loader: Composer
  logs its metrics as metrics/eval_ema/<name>. At its eval_start the EMA weights are swapped into the model, at its
  eval_end the raw ones are put back, so nothing else (the checkpoint, the next step) ever sees the EMA weights.
- `state_dict` / `load_state_dict`: Composer saves every callback's state in the checkpoint, so a resume continues
  the same average (bit for bit: the saved tensors are fp32 and the update is the same arithmetic).
- `swapped_in(module)` lends the EMA weights to an export (RUN/export with training.ema.export, and keep_best's
  export-best of the EMA's evaluation).

Under FSDP each rank holds a shard of the weights; the config refuses training.ema with training.fsdp.
"""

from contextlib import contextmanager

import torch
from composer.core import Callback, State
from composer.loggers import Logger

EMA_LABEL = "eval_ema"  # the second evaluator's label: metrics/eval_ema/... in metrics.jsonl


class WeightAverage(Callback):
    """The fp32 exponential moving average of `module`'s parameters (see the module's docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, float(decay)
        self.average: dict[str, torch.Tensor] | None = None  # parameter name -> its EMA, fp32
        self._raw: dict[str, torch.Tensor] | None = None  # the raw weights while the EMA's are lent to the model

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    def _started(self) -> dict[str, torch.Tensor]:
        if self.average is None:
            self.average = {name: p.detach().float().clone() for name, p in self._parameters().items()}
        return self.average

    @torch.no_grad()
    def update(self) -> None:
        average = self._started()
        for name, p in self._parameters().items():
            average[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def batch_end(self, state: State, logger: Logger) -> None:
        # Composer's BATCH_END comes after the optimizer step (and its gradient accumulation) of the batch
        self.update()

    @torch.no_grad()
    def swap_in(self) -> None:
        """The EMA weights into the model, the raw ones kept aside (swap_out puts them back)."""
        average, parameters = self._started(), self._parameters()
        self._raw = {name: p.detach().clone() for name, p in parameters.items()}
        for name, p in parameters.items():
            p.copy_(average[name])  # (to the parameter's own dtype and device)

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._raw is None:
            return
        for name, p in self._parameters().items():
            p.copy_(self._raw[name])
        self._raw = None

    @contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the block (an export), the raw ones back after it, even on an error.
        Inside the EMA's evaluation (already swapped in) it leaves them as they are: the evaluation's end swaps back."""
        if self._raw is not None:
            yield self.module
            return
        self.swap_in()
        try:
            yield self.module
        finally:
            self.swap_out()

    def eval_start(self, state: State, logger: Logger) -> None:
        if state.dataloader_label == EMA_LABEL:
            self.swap_in()

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label == EMA_LABEL:
            self.swap_out()

    def state_dict(self) -> dict:
        average = self._started()
        return {"decay": self.decay, "average": {name: t.detach().cpu().clone() for name, t in average.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("average")
        if not saved:  # a checkpoint from a run without training.ema: start from the loaded weights
            self.average = None
            return
        mine = self._parameters()
        if set(saved) != set(mine):
            from rafale.errors import RafaleError

            missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
            raise RafaleError(f"training.ema: the checkpoint's EMA does not match the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
        self.average = {name: saved[name].to(device=mine[name].device, dtype=torch.float32).clone() for name in mine}


def weight_average(state_or_callbacks) -> WeightAverage | None:
    """The run's WeightAverage callback, or None without training.ema."""
    callbacks = getattr(state_or_callbacks, "callbacks", state_or_callbacks)
    return next((c for c in callbacks if isinstance(c, WeightAverage)), None)
