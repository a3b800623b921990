"""Run inside an environment with InvokeAI installed (never imports tuner): how InvokeAI 6.14 takes SD3's files.
Each path is probed by its model probe (``ModelConfigFactory``), which reports the type, base and format it calls
the file; a folder it calls an SD3 main model has its transformer loaded through the submodel path the probe names
(as InvokeAI's SD3 loader does: diffusers' ``SD3Transformer2DModel.from_pretrained``), reporting its config.

    python sd3_invokeai_check.py SPEC.json OUT.json   # SPEC: {"paths": {name: path}}
"""

import json
import logging
import sys
from pathlib import Path

from diffusers import SD3Transformer2DModel
from invokeai.backend.model_manager.configs.factory import ModelConfigFactory

logging.disable(logging.WARNING)
spec = json.loads(Path(sys.argv[1]).read_text())
report = {}
for name, path in spec["paths"].items():
    try:
        config = ModelConfigFactory.from_model_on_disk(path).config
    except Exception as e:  # noqa: BLE001 - what InvokeAI says of a file it does not take
        report[name] = {"type": None, "base": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        continue
    entry = {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base", "format")}
    submodels = getattr(config, "submodels", None) or {}
    entry["submodels"] = sorted(getattr(k, "value", str(k)) for k in submodels)
    for key, definition in submodels.items():
        if getattr(key, "value", key) == "transformer":
            transformer = SD3Transformer2DModel.from_pretrained(definition.path_or_prefix)
            config = transformer.config
            entry["transformer"] = {"qk_norm": config.qk_norm, "num_layers": config.num_layers,
                                    "dual_attention_layers": list(config.dual_attention_layers)}  # fmt: skip
    report[name] = entry
Path(sys.argv[2]).write_text(json.dumps(report, indent=1))
