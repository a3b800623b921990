"""The embedded digits demo, one wing the core does not know about: the base tuner trains itself on
scikit-learn's handwritten digits (``base.py``), the quickstart's synthetic subject and the independent
classifier that scores samples (``data.py``), and the stages that use them (``stages.py``: subject,
evaluate_base, evaluate). ``tuner/runner.py`` registers its stages and its base beside the others.
"""
