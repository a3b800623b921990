"""The schema of the ``data`` section: the images (and clips, and edit pairs) a run trains on, where they come
from and how they are standardized. Part of the configuration schema (tuner/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.choices import CaptionMissing, Crop, Role, SourceKind, TriggerPolicy


@dataclass
class Source:
    """One input of a dataset (read by ``tuner.data.sources``)."""

    path: str
    # auto | folder | imagefolder (metadata.jsonl) | kohya (N_concept folders) | hf (save_to_disk) | parquet
    kind: SourceKind = SourceKind.auto
    # times each image appears per epoch (kohya folders set their own)
    repeats: int = 1
    # multiplies each of its images' loss
    weight: float = 1.0
    image_column: str = "image"
    # null: the first of text, caption, prompt
    caption_column: str | None = None
    # the caption of an image that has none; null: the dataset's default caption
    caption: str | None = None


@dataclass
class SourceConfig(Source):
    """One more input of the dataset, beside data.instance_dir and data.class_dir."""

    # instance (the subject or the captioned data) | class (prior preservation images)
    role: Role = Role.instance


@dataclass
class VideoConfig:
    """Clips (video files, animated GIFs, folders of frames), read when ``frames`` is set (tuner/data/video.py)."""

    # frames per training window, a count the family's VAE takes: k * frame_step + 1 (Wan: 4k+1, e.g. 81);
    # 0: images only (a video file is rejected by name)
    frames: int = 0
    frame_step: int = 4
    # a clip shorter than frames keeps the longest k * frame_step + 1 frames it has when at least this many;
    # null: frames (a shorter clip is rejected as too short)
    min_frames: int | None = None
    # the rate clips are resampled to, by timestamps (a variable-rate clip comes out even); null: each clip's own
    fps: float | None = None
    # windows cut from each clip, spread from its start to its end without overlapping; 1: its first frames
    windows: int = 1
    # the rate of a folder of frames (frame_0001.png, ...); null: data.video.fps, else 24
    folder_fps: float | None = None


@dataclass
class DataConfig:
    # a folder of images (or any kind data.sources takes, detected) and the prompt of images without a caption
    instance_dir: str | None = None
    instance_prompt: str | None = None
    class_dir: str | None = None
    class_prompt: str | None = None
    # more inputs: [{path: DIR, kind: kohya, role: instance, repeats: 2, weight: 0.5}, ...]
    sources: list[SourceConfig] = field(default_factory=list)
    resolution: int = "${model.resolution}"  # type: ignore[assignment]
    # center | random | none (none squashes the whole image to the square)
    crop: Crop = Crop.center
    # aspect-ratio buckets of area resolution^2, sides multiples of bucket_step, ratio within the range
    buckets: bool = False
    bucket_step: int = 64
    min_ratio: float = 0.5
    max_ratio: float = 2.0
    # false: images smaller than the bucket area keep their size (rounded down to the step)
    upscale: bool = True
    # an image without a caption: default (the role's prompt) | reject
    caption_missing: CaptionMissing = CaptionMissing.default
    # replaces [trigger] in captions; trigger_policy=prefix also puts it before captions lacking it
    trigger: str | None = None
    trigger_policy: TriggerPolicy = TriggerPolicy.replace
    # while training: the share of samples trained with the empty caption (for guidance), and comma-separated
    # tags shuffled after the first keep_tags (the text encoder then runs in every step)
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 1
    # reject images within this many bits (of 64) of a kept image's difference hash; 0: exact duplicates only
    near_duplicate_bits: int = 0
    # processes decoding and resizing images
    workers: int = 1
    # images with a shorter side than this are rejected
    min_side: int = 8
    # RGBA and LA images are composited on this colour
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # larger images are rejected as decompression bombs
    max_pixels: int = 178_956_970
    # held-out images for the validation loss (validation.every): this share of the instance images (and of the
    # class images, with prior preservation), chosen by seed and never trained on; or a folder of its own
    val_split: float = 0.0
    val_dir: str | None = None
    # edit families (Family.REFERENCES): folders of reference images, each matched to instance_dir's images by
    # relative path without the extension (photo.jpg <- DIR/photo.png); a target without one trains as a plain
    # text-to-image sample unless require_controls. Or a jsonl of {"target": ..., "controls": [...], "caption": ...}
    # with paths relative to the file
    controls: list[str] = field(default_factory=list)
    pairs: str | None = None
    require_controls: bool = False
    # clips beside images (an image is a one-frame clip): data.video.frames=81 reads them
    video: VideoConfig = field(default_factory=VideoConfig)
