"""One input of a dataset, as the prepare stage and the config (``data.sources``) describe it."""

from dataclasses import dataclass


@dataclass
class Source:
    """One input of a dataset."""

    path: str
    # auto | folder | imagefolder (metadata.jsonl) | kohya (N_concept folders) | hf (save_to_disk) | parquet
    kind: str = "auto"
    # times each image appears per epoch (kohya folders set their own)
    repeats: int = 1
    # multiplies each of its images' loss
    weight: float = 1.0
    image_column: str = "image"
    # null: the first of text, caption, prompt
    caption_column: str | None = None
    # the caption of an image that has none; null: the dataset's default caption
    caption: str | None = None
