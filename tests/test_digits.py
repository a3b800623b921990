"""The digits data, the quickstart subject and the independent classifier."""

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tuner.config import BaseConfig
from tuner.digits import data as digits
from tuner.digits.base import check, parameter_groups
from tuner.errors import ConfigError
from tuner.models import tiny


def test_captions_name_the_digit_in_words():
    assert digits.caption(7) == "a photo of the digit seven"
    assert [digits.caption(k).split()[-1] for k in range(10)] == list(digits.WORDS)


def test_images_are_dark_ink_on_white():
    images, labels = digits.load_images(16)
    assert images.shape == (1797, 3, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1 and images.max() <= 1
    assert images[:, :, 0, 0].mean() > 0.9  # corners are paper
    assert images.mean() > 0.2  # mostly paper, some ink


def test_classifier_is_accurate_on_held_out_digits():
    from sklearn.svm import SVC

    images, labels = digits.load_images(16)
    x, y = digits.features(images), labels.numpy()
    rng = np.random.default_rng(0).permutation(len(y))
    train, test = rng[:1200], rng[1200:]
    assert SVC(gamma="scale", C=10.0).fit(x[train], y[train]).score(x[test], y[test]) > 0.97


def test_subject_images_are_real_pngs_the_classifier_tells_apart(tmp_path):
    paths = digits.write_subject_images(tmp_path, digit=7, transform="mirror", count=5, seed=0, size=64)
    assert len(paths) == 5
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.shape == (64, 64, 3) and a.dtype == np.uint8 for a in arrays)
    subject = digits.ink_to_pixels(digits.subject_ink(7, "mirror", 5, 0), 16)
    clf = digits.DigitClassifier(16, extra_images=subject)
    # other mirrored sevens, never seen by the classifier, are mostly recognised as the subject
    ink, labels = digits._raw()
    others = [ink[i][:, ::-1] for i in np.flatnonzero(labels == 7)[20:80]]
    assert np.mean(clf.predict(digits.ink_to_pixels(np.stack(others), 16)) == 10) > 0.5
    sevens = digits.ink_to_pixels(ink[np.flatnonzero(labels == 7)[:60]], 16)
    assert np.mean(clf.predict(sevens) == 7) > 0.95


def test_the_base_trains_the_captions_way_in_faster():
    """The cross-attention's key and value projections (where the caption enters) get their own learning rate."""
    unet = tiny.build_components(tiny.SIZES["test"])["unet"]
    cfg = BaseConfig(unet_lr=1e-3, cross_attention_lr=4.0)
    rest, cross = parameter_groups(unet, cfg)
    names = {id(p): n for n, p in unet.named_parameters()}
    crossed = sorted(names[id(p)] for p in cross["params"])
    assert crossed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in crossed)
    assert cross["lr"] == 4e-3 and "lr" not in rest  # the rest at the run's unet_lr
    assert len(cross["params"]) + len(rest["params"]) == len(names)


def test_bad_base_training_settings_are_refused():
    base = OmegaConf.structured(BaseConfig())
    check(OmegaConf.create({"base": base}))
    for key, value in (("cross_attention_lr", 0.0), ("cross_attention_lr", float("nan")), ("snr_gamma", -1.0)):
        bad = base.copy()
        bad[key] = value
        with pytest.raises(ConfigError, match=f"base.{key}"):
            check(OmegaConf.create({"base": bad}))
    off = base.copy()
    off.snr_gamma = None
    check(OmegaConf.create({"base": off}))
