"""Clips as data (tuner/data/video.py) and clips as outputs (tuner/export/video.py), on clips the tests write with
PyAV: each frame's colour encodes its index, so which source frame landed where can be read back from the pixels."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tuner.data.prepare import load_prepared, prepare
from tuner.data.sources import Source
from tuner.data.video import Clip, Timing, check, timeline, windows
from tuner.data_config import DataConfig, VideoConfig
from tuner.export.video import poster, write_video

STEP = 8  # frame k is grey 8 * k: up to 32 frames told apart after lossy coding


def _grey(k: int, size=(40, 32)) -> np.ndarray:
    return np.full((size[1], size[0], 3), (STEP * k) % 256, np.uint8)


def write_clip(
    path: Path, n: int, fps: int = 24, codec: str = "libx264", pts_ms: list[int] | None = None, gop: int = 0
):
    """``n`` frames at ``fps``, or at the given presentation times in milliseconds (a variable frame rate); ``gop``:
    a keyframe every so many frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options={"crf": "1"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = 40, 32, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(_grey(k), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    return path


def index_of(png_frame) -> int:
    """The source frame a stored frame shows (its grey level / STEP)."""
    return round(np.asarray(png_frame.convert("L"), np.float32).mean() / STEP)


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def clips(tmp_path) -> Path:
    root = tmp_path / "clips"
    root.mkdir()
    write_clip(root / "walk.mp4", 30)  # 1.25 s at 24 fps
    (root / "walk.txt").write_text("a dog walks")
    write_clip(root / "wave.webm", 20, codec="libvpx-vp9")
    write_clip(root / "turn.mov", 16)  # 8 frames at 12 fps
    write_clip(root / "blink.mp4", 3)  # too short
    gaps = [60 if k % 2 else 20 for k in range(29)]  # 20 ms, 60 ms, 20 ms, ...: a phone's variable rate
    write_clip(root / "phone.mp4", 30, pts_ms=[sum(gaps[:k]) for k in range(30)])
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 600)  # an mp4 header, then nothing
    write_audio_only(root / "song.m4a.mp4")
    frames = root / "jump"  # a folder of frames, its caption inside
    frames.mkdir()
    for k in range(12):
        Image.fromarray(_grey(k)).save(frames / f"frame_{k + 1:04d}.png")
    (frames / "caption.txt").write_text("a jump")
    gif = [Image.fromarray(_grey(k)) for k in range(9)]
    gif[0].save(root / "spin.gif", save_all=True, append_images=gif[1:], duration=[40, 80] * 4 + [40], loop=0)
    Image.fromarray(_grey(3, (48, 48))).save(root / "still.png")  # an image: a one-frame clip
    return root


def test_prepare_reports_every_clip_and_stores_windows_as_frames(clips, tmp_path):
    before = _tree(clips)
    d = DataConfig(resolution=32, video=VideoConfig(frames=9, fps=12.0, windows=2, min_frames=5))
    report = prepare([Source(str(clips))], tmp_path / "out", d, "a clip")
    assert _tree(clips) == before  # sources untouched
    by_file = {c["file"]: c for c in report.clips}
    assert {f: c["status"] for f, c in by_file.items()} == {
        "blink.mp4": "rejected", "broken.mp4": "rejected", "jump/": "kept", "phone.mp4": "kept",
        "song.m4a.mp4": "rejected", "spin.gif": "kept", "turn.mov": "kept", "walk.mp4": "kept", "wave.webm": "kept",
    }  # fmt: skip
    assert by_file["blink.mp4"]["reason"] == "too short"
    assert by_file["broken.mp4"]["reason"] == "unreadable stream"
    assert by_file["song.m4a.mp4"]["reason"] == "no video stream"
    assert by_file["walk.mp4"] | {"file": 0} == {
        "file": 0, "status": "kept", "source_fps": 24.0, "fps": 12.0, "frames": 15, "windows": [[0, 9]],
        "variable_rate": False,
    }  # fmt: skip
    assert by_file["phone.mp4"]["variable_rate"] and by_file["spin.gif"]["variable_rate"]
    assert not by_file["wave.webm"]["variable_rate"]
    assert by_file["turn.mov"]["windows"] == [[0, 5]]  # 8 frames at 12 fps: the longest 4k+1 it has
    assert by_file["jump/"]["source_fps"] == 12.0  # a folder of frames plays at data.video.fps
    summary = report.summary()
    assert "clips: 6 kept (6 windows), 2 of variable frame rate resampled, 1 no video stream, 1 too short" in summary
    assert "still.png" in report.kept and "buckets: 32x32x1 1, 32x32x5 2, 32x32x9 4" in summary

    rows = {r["source"]: r for r in load_prepared(tmp_path / "out")}
    walk = rows["walk.mp4#0"]
    assert walk["caption"] == "a dog walks" and walk["fps"] == 12.0 and walk["window"] == 0
    assert [index_of(f) for f in walk["frames"]] == [0, 2, 4, 6, 8, 10, 12, 14, 16]  # 24 -> 12 fps: every other
    assert index_of(walk["image"]) == 0 and walk["frames"][0].size == (32, 32)
    assert rows["jump/#0"]["caption"] == "a jump"
    assert [index_of(f) for f in rows["jump/#0"]["frames"]] == list(range(9))
    # the phone clip's frames by their times: 0, 20, 80, 100, 160, ... ms; at 12 fps (83.3 ms apart) the frame on
    # screen at k * 83.3 ms
    times = [sum(([60 if k % 2 else 20 for k in range(29)])[:k]) for k in range(30)]
    expected = [max(i for i, t in enumerate(times) if t <= k * 1000 / 12 + 1e-6) for k in range(9)]
    assert [index_of(f) for f in rows["phone.mp4#0"]["frames"]] == expected
    still = rows["still.png"]
    assert len(still["frames"]) == 1 and still["fps"] == 0.0 and index_of(still["frames"][0]) == 3

    again = prepare([Source(str(clips))], tmp_path / "out", d, "a clip")  # same inputs: nothing done again
    assert again.clips == report.clips


def test_windows_spread_and_a_window_decodes_only_its_frames(tmp_path):
    path = write_clip(tmp_path / "long.mp4", 240, fps=30, gop=12)
    d = DataConfig(resolution=16, video=VideoConfig(frames=5, windows=3))
    report = prepare([Source(str(tmp_path))], tmp_path / "out", d, "x")
    assert report.clips[0]["windows"] == [[0, 5], [118, 5], [235, 5]]
    rows = load_prepared(tmp_path / "out")
    assert [[index_of(f) for f in r["frames"]] for r in rows] == [
        [k % 32 for k in range(s, s + 5)] for s in (0, 118, 235)
    ]
    clip = Clip(path)
    assert len(clip.frames({0, 1, 2, 3, 4}, lambda image: b"")) == 5 and clip.decoded == 5  # not 240
    clip = Clip(path)  # a window far in: from the keyframe before it (every 12 frames), not from the start
    assert len(clip.frames(set(range(118, 123)), lambda image: b"")) == 5 and clip.decoded <= 12 + 5


def test_timing_windows_and_settings_rules():
    even = Timing([k / 24 for k in range(48)], 2.0)
    assert timeline(even, 8.0) == [3 * k for k in range(16)] and timeline(even, None) == list(range(48))
    assert timeline(even, 48.0)[:5] == [0, 0, 1, 1, 2]  # a faster rate repeats frames
    assert windows(16, 9, 4, 9, 1) == [(0, 9)] and windows(20, 9, 4, 9, 5) == [(0, 9), (11, 9)]
    assert windows(8, 9, 4, 5, 1) == [(0, 5)]
    with pytest.raises(Exception, match="too short"):
        windows(8, 9, 4, 9, 1)
    assert check(VideoConfig()) is None and check(VideoConfig(frames=81, fps=16.0)) is None
    eighty = check(VideoConfig(frames=80))
    assert "k * data.video.frame_step + 1" in eighty and "e.g. 77" in eighty
    assert "positive frame rate" in check(VideoConfig(frames=9, fps=0.0))
    assert "min_frames" in check(VideoConfig(frames=9, min_frames=12))


def test_images_only_datasets_are_as_before(clips, tmp_path):
    report = prepare([Source(str(clips))], tmp_path / "out", DataConfig(resolution=32), "x")
    assert report.clips == [] and "frames" not in load_prepared(tmp_path / "out").column_names
    assert report.rejected["a video (data.video.frames=0 reads images only)"] == [
        "blink.mp4", "broken.mp4", "phone.mp4", "song.m4a.mp4", "turn.mov", "walk.mp4", "wave.webm",
    ]  # fmt: skip
    assert "spin.gif" in report.kept  # a GIF stays an image (its first frame), as before
    assert "jump/frame_0001.png" in report.kept  # a folder of frames stays a folder of images


@pytest.mark.parametrize("suffix", [".mp4", ".webp", ".gif"])
def test_written_clips_play_back_at_their_rate(tmp_path, suffix):
    frames = np.stack([_grey(k, (33, 21)) for k in range(17)]).astype(np.float32) / 255  # odd sides
    path = write_video(frames, tmp_path / f"clip{suffix}", fps=16)
    if suffix == ".mp4":
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.average_rate == 16
            assert (stream.width, stream.height) == (34, 22)  # padded to even sides
            back = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(back) == 17
        assert [round(a[:21, :33].mean() / STEP) for a in back] == list(range(17))
    else:
        with Image.open(path) as image:
            assert image.n_frames == 17 and image.size == (33, 21)
            image.seek(5)
            assert round(np.asarray(image.convert("L"), np.float32).mean() / STEP) == 5
            assert image.info["duration"] in (60, 62)  # 1000 / 16 ms (GIF: hundredths of a second)
    assert index_of(poster(frames)) == 0
    with pytest.raises(ValueError, match="positive frame rate"):
        write_video(frames, tmp_path / "x.mp4", fps=0)
    with pytest.raises(ValueError, match="a clip is written as"):
        write_video(frames, tmp_path / "x.avi", fps=8)


def test_data_video_keys_compose_and_a_count_the_vae_refuses_is_named(clips, tmp_path):
    from omegaconf import OmegaConf

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError

    given = [f"data.instance_dir={clips}", "data.resolution=32", "data.video.fps=12"]
    with pytest.raises(ConfigError, match="data.video.frames=8: a count the VAE takes"):
        validate(compose("prepare", [*given, "data.video.frames=8"]))
    cfg = compose("prepare", [*given, "data.video.frames=9"])
    validate(cfg)
    d = OmegaConf.to_object(cfg.data)
    assert d.video == VideoConfig(frames=9, fps=12.0)


@pytest.mark.e2e
def test_prepare_recipe_reads_data_video_keys(clips, tmp_path):
    """`python -m tuner recipe=prepare data.video.frames=...` as a user runs it; a count the VAE refuses is named."""
    from tests.helpers import run_tuner

    common = [f"data.instance_dir={clips}", "data.resolution=32", "data.instance_prompt=a clip"]
    refused = run_tuner("recipe=prepare", *common, "data.video.frames=8", f"output_dir={tmp_path / 'no'}",
                        home=tmp_path / "home", cwd=tmp_path)  # fmt: skip
    assert refused.returncode != 0 and "data.video.frames=8: a count the VAE takes" in refused.stderr + refused.stdout
    result = run_tuner("recipe=prepare", *common, "data.video.frames=9", "data.video.fps=12",
                       f"output_dir={tmp_path / 'out'}", home=tmp_path / "home", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(c["file"] for c in report["clips"] if c["status"] == "kept") == [
        "jump/",
        "phone.mp4",
        "walk.mp4",
        "wave.webm",
    ]  # spin.gif (9 frames at 12.5 fps) and turn.mov (8 at 12) are short of 9 frames at 12 fps without min_frames
    assert "clips: 4 kept" in result.stdout


def test_a_training_recipe_on_clips_is_refused_until_clips_train(tmp_path):
    """Clips are prepared, not trained on yet: a training recipe with data.video.frames set is refused before
    anything loads, naming the key, instead of training on each window's first frame alone."""
    from tuner.compose import compose
    from tuner.errors import ConfigError
    from tuner.training.checks import check_train

    args = [f"model.path={tmp_path}", f"data.instance_dir={tmp_path}", "data.instance_prompt=a clip"]
    with pytest.raises(ConfigError, match=r"data.video.frames=9: training on clips is not built yet"):
        check_train(compose("lora", [*args, "data.video.frames=9"]))
    check_train(compose("lora", args))
