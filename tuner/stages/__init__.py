"""The stages a recipe's ``stages:`` may name, one module each; ``tuner/runner.py`` lists them in order.

    base -> prepare -> class_images -> train -> export -> gallery     a training recipe
    base -> load_adapter -> gallery                                   recipe=evaluate
    base -> generate                                                  recipe=generate

A stage is a function ``stage(run)`` declared with ``@stage`` (``context.py``): which stages must come
before it, which entries of the run folder it writes, its own checks of the config. It reads the
read-only config and the results of earlier stages, and returns its own (``Base``, ``Adapted``, ...).
The embedded digits demo adds its stages (subject, evaluate_base, evaluate) from tuner/digits/.
"""
