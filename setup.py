"""The package list, found from the source tree (pyproject.toml holds everything else): every package under
tuner/, plus conf/ and recipes/, which stay at the top of the repo and ship inside the wheel as tuner.presets.conf
and tuner.presets.recipes (pyproject.toml's package-dir). A declarative ``packages.find`` cannot add those two."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["tuner", "tuner.*"]), "tuner.presets.conf", "tuner.presets.recipes"])
