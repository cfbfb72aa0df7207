"""The task interface: what a task decides, with the defaults most tasks keep.

A task is bound to one experiment (``self.cfg``). Everything that differs between tasks goes through
these methods; code outside a task's file never branches on the task's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedlora.core.config import TASK_DATA_KEYS, ConfigError, ExperimentConfig
from fedlora.privacy.mechanisms import mechanism_for

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedlora.core.training.loops import Encoded, Scores


class Task:
    """Base class of every task; subclasses are registered with :func:`fedlora.tasks.registry.register`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    """peft's ``TaskType`` name for the adapter (``SEQ_CLS`` trains a head too, ``CAUSAL_LM`` does not)."""
    data_keys: ClassVar[tuple[str, ...]] = ()
    """The task-specific ``[data]`` keys (of :data:`~fedlora.core.config.TASK_DATA_KEYS`) this task reads;
    setting any other one is refused in one line."""
    zero_shot: ClassVar[bool] = False
    """Whether round 0 (the untouched model, B = 0) is evaluated before training: meaningful for a
    pretrained model that can already do the task, not for a fresh head."""
    ghost_clipping: ClassVar[bool] = True
    """Whether DP-SGD's ghost clipping (``privacy.opacus_mode = "ghost"``) fits this task: Opacus then
    applies its own cross-entropy criterion, so a task with another per-example loss sets False and the
    combination is refused in one line."""
    long_evaluation: ClassVar[bool] = False
    """Whether evaluation is long enough that the server should pin torch to ``federation.client_cpus``
    threads (a CPU shared with the client actors is otherwise oversubscribed)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    # -- configuration and pre-flight ------------------------------------------------------------------

    def check_config(self) -> None:
        """Config rules of this task (no disk read); ConfigError with one line. The default refuses the
        task-specific data keys this task does not read."""
        for key in TASK_DATA_KEYS:
            value = getattr(self.cfg.data, key)
            if value and key not in self.data_keys:
                raise ConfigError(
                    f"data.{key} = {value!r} does not apply to task = {self.name!r}; remove data.{key} or "
                    f"choose a task that reads it"
                )
        if not self.ghost_clipping and getattr(mechanism_for(self.cfg).options, "opacus_mode", "") == "ghost":
            raise ConfigError(
                f"privacy.opacus_mode = 'ghost' is not supported with task = {self.name!r} (Opacus's ghost "
                "clipping applies its own cross-entropy, not this task's loss); use "
                "privacy.opacus_mode = 'hooks'"
            )

    def check_model(self, directory: Path, config: dict[str, Any]) -> None:
        """Pre-flight: can this task use the model folder ``directory`` (``config``: its config.json)?
        ConfigError with one line naming the fix. Default: any folder."""

    def class_names(self) -> tuple[str, ...]:
        """The class names in label-id order (filled into ``data.labels`` before the run starts, so every
        client builds the same head); empty when the examples have no classes."""
        # start-up: sources imports datasets and pandas, which a client given data.labels never needs
        from fedlora.core.data.sources import label_names

        return label_names(self.cfg.data)

    @property
    def has_classes(self) -> bool:
        """Whether the examples have classes to count (label histograms, the majority-class baseline)."""
        return True

    # -- model -----------------------------------------------------------------------------------------

    def model_key(self) -> tuple[object, ...]:
        """What, besides the folder, LoRA settings and seed, makes this task's model differ (the process's
        model cache key): e.g. the class names of a head."""
        return ()

    def load_model(self, seed: int) -> PreTrainedModel:
        """The base model for this task, before LoRA, in float32 and train mode (new parts from ``seed``)."""
        raise NotImplementedError

    def load_trained(self, directory: Path) -> PeftModel:
        """A saved adapter folder on its base model (``model.path``), in eval mode."""
        raise NotImplementedError

    # -- data and scores -------------------------------------------------------------------------------

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        """A split tokenised for this task; the result's ``loss`` and ``scores`` define training and
        evaluation."""
        raise NotImplementedError

    def round_metrics(self, scores: Scores | None) -> dict[str, float | None]:
        """Extra per-round keys for ``rounds.jsonl`` beside eval_loss, eval_accuracy and eval_macro_f1."""
        return {}

    def summary_metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra keys for ``summary.json`` from the round rows."""
        return {}

    # -- generation ------------------------------------------------------------------------------------

    def generate(self, model: PeftModel, text: str, *, max_new_tokens: int, raw: bool) -> str:
        """``fedlora generate``: the model's answer to ``text``. Tasks that do not write text refuse."""
        raise ConfigError(
            f"fedlora generate needs a task that writes text (causal-lm); this run has task = {self.name!r}"
        )
