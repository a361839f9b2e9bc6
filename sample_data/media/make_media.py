"""Regenerate ``sample_data/media/``: small images and videos made by this project, free of rights.

    pip install pillow av        # av (PyAV) only for the videos; it bundles its own ffmpeg
    python sample_data/media/make_media.py

Images: one per format Kimi accepts (png, jpeg, webp, gif), a few sizes. Videos: a one-second
clip in each container Kimi accepts (mp4, mov, avi, flv, webm, wmv, mpeg, 3gp), a few KB each.
The pictures are simple shapes and gradients, so a caption has something to say.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def picture(width: int, height: int, hue: int, shape: str) -> Image.Image:
    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((hue + x * 255 // width) % 256, (y * 255 // height), (hue * 3) % 256)
    draw = ImageDraw.Draw(img)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    if shape == "circle":
        draw.ellipse(box, fill=(250, 250, 250), outline=(0, 0, 0), width=3)
    elif shape == "square":
        draw.rectangle(box, fill=(20, 20, 20), outline=(255, 255, 0), width=3)
    else:
        draw.polygon([(width // 2, height // 5), (width // 5, 4 * height // 5), (4 * width // 5, 4 * height // 5)],
                     fill=(255, 80, 0))
    return img


def images() -> None:
    out = HERE / "images"
    out.mkdir(parents=True, exist_ok=True)
    picture(320, 240, 10, "circle").save(out / "circle.png")
    picture(640, 480, 90, "square").save(out / "square.jpg", quality=80)
    picture(256, 256, 170, "triangle").save(out / "triangle.webp", quality=70)
    frames = [picture(96, 96, h, "circle") for h in (0, 60, 120)]
    frames[0].save(out / "blink.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    nested = out / "more"
    nested.mkdir(exist_ok=True)
    picture(1400, 700, 200, "square").save(nested / "wide.jpg", quality=60)


# (file name, PyAV container format, codec); pixel format yuv420p everywhere.
VIDEOS = [
    ("clip.mp4", "mp4", "mpeg4"),
    ("clip.mov", "mov", "mpeg4"),
    ("clip.avi", "avi", "mpeg4"),
    ("clip.flv", "flv", "flv"),
    ("clip.webm", "webm", "libvpx"),
    ("clip.wmv", "asf", "wmv2"),
    ("clip.mpeg", "mpeg", "mpeg1video"),
    ("clip.3gp", "3gp", "h263"),
]


def videos() -> None:
    import av  # only here: the rest of the samples need no ffmpeg

    out = HERE / "videos"
    out.mkdir(parents=True, exist_ok=True)
    for name, fmt, codec in VIDEOS:
        path = out / name
        width, height = (176, 144) if codec == "h263" else (160, 96)
        with av.open(str(path), "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=10 if codec != "mpeg1video" else 25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.bit_rate = 64_000
            frames = 10 if codec != "mpeg1video" else 25
            for i in range(frames):
                img = picture(width, height, int(255 * i / frames), "circle")
                draw = ImageDraw.Draw(img)
                r = 12
                cx = int(width / 2 + (width / 3) * math.cos(2 * math.pi * i / frames))
                draw.ellipse((cx - r, height // 2 - r, cx + r, height // 2 + r), fill=(0, 0, 255))
                for packet in stream.encode(av.VideoFrame.from_image(img)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


if __name__ == "__main__":
    images()
    if "--images-only" not in sys.argv:
        videos()
    for p in sorted(HERE.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(HERE.parent)}  {p.stat().st_size:,} bytes")
