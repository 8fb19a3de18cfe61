"""What a strategy is given: the prepared model, its search space, the data and the run settings,
plus factories for the torch engine (the fake-quantized model, the DNAS supernet)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx

from graph_passes.prepare import PreparedModel
from plugin.data import Dataset
from plugin.engine.config import DEFAULT_QAT_SCHEDULE
from plugin.space import Precisions, SearchSpace

if TYPE_CHECKING:
    from plugin.engine.config import SearchConfig
    from plugin.engine.fakequant import FakeQuantModel
    from plugin.engine.supernet import Supernet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """The strategy-independent settings of one run (from ``CompressConfig``).

    ``target``: the budget text (``size=35%``) or None; ``lam``: the cost weight when no target.
    ``epochs``: the search's training budget; QAT (``finetune_epochs``) follows every strategy."""

    precisions: Precisions
    cost: str = "size"
    lam: float | None = None
    target: str | None = None
    epochs: int = 20
    finetune_epochs: int = 10
    qat_schedule: str = DEFAULT_QAT_SCHEDULE  # the QAT learning-rate schedule (plugin.engine.config.QAT_SCHEDULES)
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    task_loss: str = "distill_kl"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass
class Problem:
    """A compression problem. ``space`` is torch-free; :meth:`supernet` and :meth:`fake_quant`
    bridge the normalised model to torch (parity-checked) when a strategy asks for them."""

    prepared: PreparedModel
    space: SearchSpace
    train: Dataset
    held_out: Dataset
    settings: RunSettings
    output: str | None = None  # the model path compress will write (None: nothing is written), e.g. for a study file beside it

    @property
    def model(self) -> onnx.ModelProto:
        """The normalised ONNX model every plan refers to."""
        return self.prepared.model

    def search_config(self, **overrides: Any) -> SearchConfig:
        """The engine's settings for this run (``overrides`` replace fields)."""
        from plugin.engine.config import SearchConfig

        s = self.settings
        base = dict(weight_precisions=s.precisions.weights, activation_precisions=s.precisions.activations,
                    act_bits=None, cost_model=s.cost, lam=1.0 if s.lam is None else s.lam, epochs=s.epochs,
                    batch_size=s.batch_size, max_steps_per_epoch=s.max_steps_per_epoch, task_loss=s.task_loss,
                    device=s.device, seed=s.seed, progress=s.progress)
        base.update(overrides)
        return SearchConfig(**base)

    def _space_for(self, config: SearchConfig) -> SearchSpace:
        precisions = Precisions(config.weight_precisions, config.site_precisions)
        if precisions == self.space.precisions:
            return self.space
        space = SearchSpace(self.space.analysis, precisions, model_sha256=self.space.model_sha256)
        space.set_clips(self.space.clips)
        return space

    def supernet(self, config: SearchConfig | None = None, model: onnx.ModelProto | None = None) -> Supernet:
        """A DNAS supernet of ``model`` (default: the problem's; another model must have the same
        graph, e.g. the problem's with other weights), on the run's device."""
        from plugin.engine.supernet import Supernet

        config = config or self.search_config()
        net = Supernet.build(model or self.model, config, space=self._space_for(config))
        _check_batching(net, self.train, config)
        return net.to(config.device)

    def fake_quant(self, config: SearchConfig | None = None, model: onnx.ModelProto | None = None) -> FakeQuantModel:
        """A fake-quantized model (no logits) that freezes any plan."""
        from plugin.engine.fakequant import FakeQuantModel

        config = config or self.search_config()
        net = FakeQuantModel.build(model or self.model, config, space=self._space_for(config))
        _check_batching(net, self.train, config)
        return net.to(config.device)


def _check_batching(net: Any, train: Dataset, config: SearchConfig) -> None:
    """Some graphs fix the batch size in a constant; then train one sample at a time."""
    import torch

    if getattr(train, "per_sample", False):  # inputs without a batch in dim 0 (graph_passes.batch)
        config.batch_size = 1
        return

    inputs = [torch.as_tensor(train.arrays[n][:2]) for n in net.input_names]
    try:
        with torch.no_grad():
            net.teacher_outputs(*inputs)
    except RuntimeError as exc:
        logger.warning("the model only runs one sample at a time (%s); training with batch size 1",
                       str(exc).splitlines()[0][:120])
        config.batch_size = 1


def replace_settings(settings: RunSettings, **changes: Any) -> RunSettings:
    return dataclasses.replace(settings, **changes)


__all__ = ["Problem", "RunSettings", "replace_settings"]
