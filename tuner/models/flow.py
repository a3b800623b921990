"""What the flow-matching transformer families (Flux, SD3, Flux.2, Qwen-Image) share: a transformer trained
by flow matching (``tuner.models.objectives.FlowObjective``), sampled with the flow schedulers, at 1024 px."""

from __future__ import annotations

from tuner.errors import ConfigError
from tuner.models.base import Components, Family
from tuner.models.objectives import FlowObjective


class FlowFamily(Family):
    """What the flow-matching transformer families share."""

    DENOISER = "transformer"
    TRAINING_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
    FLOW = True
    DEFAULT_SCHEDULER = "flow_euler"
    EXPORTS = ("diffusers", "peft", "merged")
    RESOLUTION_MULTIPLE = 16
    DEFAULT_RESOLUTION = 1024
    MAX_SEQUENCE_LENGTH = 512  # the pipeline's default T5 prompt length

    def prediction(self, c: Components, override: str | None) -> str:
        if override not in (None, "flow"):
            raise ConfigError(f"model.prediction_type={override}: model={self.NAME} trains by flow matching")
        return "flow"

    def objective(self, c: Components):

        m = self.model
        return FlowObjective(
            c.noise_scheduler,
            self.predict,
            weighting=m.weighting_scheme,
            logit_mean=m.logit_mean,
            logit_std=m.logit_std,
            mode_scale=m.mode_scale,
            shift=m.timestep_shift,
        )

    @property
    def max_sequence_length(self) -> int:
        return self.model.max_sequence_length or self.MAX_SEQUENCE_LENGTH

    def call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}
