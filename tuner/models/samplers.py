"""The samplers each family offers by name, and the diffusers scheduler behind each: one table for the
DDPM-type families, one for the flow-matching ones (``Family.FLOW``). The family's default sampler
(``Family.DEFAULT_SCHEDULER``) draws its galleries and validation images and is generate's default.
"""

from __future__ import annotations

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
    """The samplers ``family`` offers by name; its default (gallery and generate's) first."""
    table = FLOW_SCHEDULERS if family.FLOW else NOISE_SCHEDULERS
    return {name: table[name] for name in (family.DEFAULT_SCHEDULER, *table) if name not in family.NO_SCHEDULERS}


def scheduler(name: str, family, config):
    """A diffusers scheduler by tuner's short name, from the base's scheduler config, with the family's
    sampling settings (SD2 zero-terminal-SNR: trailing timesteps) and, for the flow-sigma solvers, the
    schedule's shift."""
    import diffusers

    cls, extra = schedulers(family)[name]
    extra = {**extra, **family.sampling_settings()}
    if extra.get("use_flow_sigmas"):
        extra["flow_shift"] = config.get("shift", 1.0)
    return getattr(diffusers, cls).from_config(config, **extra)
