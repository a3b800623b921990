"""The samplers each family offers by name, and the diffusers scheduler behind each: one table for the
DDPM-type families, one for the flow-matching ones (``Family.FLOW``).

With no sampler named, galleries, validation images, class images and ``recipe=generate`` draw with the
scheduler the base folder saves (the class its ``model_index.json`` names, as ``pipe(prompt)`` loads it),
where the family's pipeline drives it (``default``); otherwise with the family's ``DEFAULT_SCHEDULER``.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> (diffusers class, extra config), by the kind of schedule a family trains with (``Family.FLOW``)
NOISE_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
# flow matching: the family's own shift (model.timestep_shift or its scheduler config's), Flux's dynamic shift
FLOW_SCHEDULERS = {
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow_dpm++": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
    "flow_unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}


def schedulers(family) -> dict[str, tuple[str, dict]]:
    """The samplers ``family`` offers by name; its ``DEFAULT_SCHEDULER`` (the fallback of ``default``) first."""
    table = FLOW_SCHEDULERS if family.FLOW else NOISE_SCHEDULERS
    return {name: table[name] for name in (family.DEFAULT_SCHEDULER, *table) if name not in family.NO_SCHEDULERS}


def drivable(family) -> set[str]:
    """The scheduler classes ``family``'s pipeline draws with: those of its samplers and, for the DDPM-type
    families, the ones diffusers lists as interchangeable with them (``_compatibles``: LMS, KDPM2, DEIS, ...).
    A flow family's pipeline takes only its own (FluxPipeline passes sigmas FlowMatch Heun cannot take)."""
    import diffusers

    classes = {cls for cls, _ in schedulers(family).values()}
    if not family.FLOW:
        classes |= {name for cls in list(classes) for name in getattr(diffusers, cls)._compatibles}
    return classes


def scheduler(name: str, family, config):
    """A diffusers scheduler by tuner's short name, or by the class name of a base's own scheduler (``default``),
    from the base's scheduler config, with the family's sampling settings (SD2 zero-terminal-SNR: trailing
    timesteps) and, for the flow-sigma solvers, the schedule's shift."""
    import diffusers

    offered = schedulers(family)
    if name not in offered and name not in drivable(family):
        raise KeyError(f"{name}: not a sampler of model={family.NAME} ({', '.join(offered)})")
    cls, extra = offered.get(name, (name, {}))
    extra = {**extra, **family.sampling_settings()}
    if extra.get("use_flow_sigmas"):
        extra["flow_shift"] = config.get("shift", 1.0)
    return getattr(diffusers, cls).from_config(config, **extra)


@dataclass(frozen=True)
class Default:
    """The sampler a base draws with when none is named."""

    name: str  # tuner's short name (euler), else the diffusers class of the base's own scheduler
    saved: str | None  # the scheduler class the base folder's model_index.json names (None: not known)
    from_base: bool  # the base's own scheduler; False: the family's DEFAULT_SCHEDULER (the base's cannot serve)
    fewest_steps: int = 1  # PNDM without skip_prk_steps: its Runge-Kutta warm-up takes 4

    def describe(self) -> str:
        """For logs and summaries: which sampler and where it came from."""
        if self.from_base:
            named = f" ({self.saved})" if self.saved != self.name else ""
            return f"{self.name}{named}, the base's own scheduler"
        if self.saved is None:
            return f"{self.name}, the family's default (the base names no scheduler)"
        return f"{self.name}, the family's default (the base's {self.saved} is not one its pipeline draws with)"


def _settings(s) -> dict:
    return {k: v for k, v in s.config.items() if not k.startswith("_")}


def fewest_steps(s) -> int:
    """The fewest steps scheduler ``s`` runs: PNDM's warm-up takes 4 unless its config skips it."""
    return 4 if type(s).__name__ == "PNDMScheduler" and not s.config.get("skip_prk_steps") else 1


def default(family, c) -> Default:
    """The sampler of a base loaded as components ``c`` (``Family.load``) when none is named: the scheduler its
    folder saves (``c.extra["scheduler_class"]``) over the run's scheduler config (``c.noise_scheduler``: its
    prediction type, SD2's zero-terminal-SNR schedule) with the family's sampling settings, where the family's
    pipeline draws with that class (``drivable``: of the family's kind, flow or not); else the family's
    ``DEFAULT_SCHEDULER``. Named by tuner's short name when one builds the same scheduler, else by its class."""
    import diffusers

    saved, config = c.extra.get("scheduler_class"), c.noise_scheduler.config
    fallback = Default(family.DEFAULT_SCHEDULER, saved, False)
    if not isinstance(saved, str) or saved not in drivable(family):
        return fallback
    try:
        own = getattr(diffusers, saved).from_config(config, **family.sampling_settings())
    except Exception:  # noqa: BLE001 - a class diffusers offers but cannot build here (torchsde missing, ...)
        return fallback
    flow = saved.startswith("FlowMatch") or bool(own.config.get("use_flow_sigmas"))
    if flow != bool(family.FLOW):
        return fallback
    same = [  # the most specific first: dpm++_karras before dpm++ for a base saved with Karras sigmas
        short
        for short, (cls, extra) in sorted(schedulers(family).items(), key=lambda item: -len(item[1][1]))
        if cls == saved and _settings(scheduler(short, family, config)) == _settings(own)
    ]
    return Default(same[0] if same else saved, saved, True, fewest_steps(own))
