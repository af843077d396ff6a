"""The image rules of the submit request, for every accepted format."""

from __future__ import annotations

import base64

import pytest

from contracts.images import MAX_BYTES, ImageError, check_image_field, inspect_data_uri
from tests import imaging
from tests.imaging import data_uri

MAKERS = {
    "png": imaging.png,
    "gif": imaging.gif,
    "bmp": imaging.bmp,
    "webp": imaging.webp_vp8x,
    "jpeg": imaging.jpeg,
    "tiff": imaging.tiff,
}


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_each_format_reports_its_pixel_size(fmt: str) -> None:
    info = inspect_data_uri(data_uri(MAKERS[fmt](1280, 720), fmt))
    assert (info.format, info.width, info.height) == (fmt, 1280, 720)


@pytest.mark.parametrize(
    "data",
    [
        imaging.webp_vp8l(700, 500),
        imaging.tiff(700, 500, big_endian=True),
        imaging.jpeg(700, 500, app_padding=60_000),
    ],
    ids=["webp-lossless", "tiff-big-endian", "jpeg-with-deep-frame-header"],
)
def test_less_common_layouts_are_read(data: bytes) -> None:
    info = inspect_data_uri(data_uri(data, "jpeg"))
    assert (info.width, info.height) == (700, 500)


@pytest.mark.parametrize(
    ("width", "height", "ok"),
    [
        (301, 301, True),
        (300, 400, False),
        (400, 300, False),
        (5999, 5000, True),
        (6000, 5000, False),
        (1000, 401, True),
        (1000, 400, False),
        (2490, 1000, True),
        (2500, 1000, False),
    ],
)
def test_sides_and_aspect_ratio_bounds_are_exclusive(width: int, height: int, ok: bool) -> None:
    uri = data_uri(imaging.gif(width, height), "gif")
    if ok:
        inspect_data_uri(uri)
    else:
        with pytest.raises(ImageError):
            inspect_data_uri(uri)


def test_an_image_of_30_mb_or_more_is_rejected_without_decoding_it() -> None:
    head = imaging.png(640, 360)
    uri = data_uri(head + b"\x00" * (MAX_BYTES - len(head)))
    with pytest.raises(ImageError, match="under 31457280 bytes"):
        inspect_data_uri(uri)
    inspect_data_uri(data_uri(head + b"\x00" * (MAX_BYTES - len(head) - 3)))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/svg+xml;base64,AAAA", "not one of"),
        ("data:text/plain;base64,AAAA", "data:image/<format>"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png;base64,AAA", "multiple of 4"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        (data_uri(b"hello, this is text, not an image"), "not a readable"),
        (data_uri(imaging.png(640, 360)[:20]), "truncated"),
    ],
)
def test_broken_data_uris_get_a_clear_message(uri: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        inspect_data_uri(uri)


def test_messages_never_quote_the_payload() -> None:
    payload = base64.b64encode(b"SECRET-PIXELS" * 30).decode()
    with pytest.raises(ImageError) as caught:
        inspect_data_uri(f"data:image/png;base64,{payload}")
    assert payload[:16] not in str(caught.value)


@pytest.mark.parametrize("url", ["https://example.com/a.png", "http://10.0.0.1:8080/x?y=1"])
def test_http_urls_are_accepted(url: str) -> None:
    assert check_image_field(url) == url


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "https://", "example.com/a.png"])
def test_other_urls_are_rejected(url: str) -> None:
    with pytest.raises(ImageError):
        check_image_field(url)


# Checked against a real encoder: Pillow writes every accepted format in its common variants (progressive
# and CMYK JPEG, a JPEG whose frame header sits behind 60 KB of ICC profile or 20 KB of EXIF, interlaced and
# 16-bit PNG, lossy, lossless and extended WebP, BMP with alpha, LZW TIFF), at the edges of the rules; the
# verdict expected follows from the rules alone and the size Pillow reads back.
def _encode(variant: str, width: int, height: int) -> tuple[str, bytes]:
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    rgb = Image.new("RGB", (width, height), (200, 100, 50))
    exif = Image.Exif()
    exif[0x010E] = "x" * 20_000
    fmt, image, options = {
        "png": ("png", rgb, {}),
        "png-interlaced": ("png", rgb, {"interlace": 1}),
        "png-16bit": ("png", Image.new("I;16", (width, height)), {}),
        "jpeg": ("jpeg", rgb, {}),
        "jpeg-progressive": ("jpeg", rgb, {"progressive": True}),
        "jpeg-cmyk": ("jpeg", rgb.convert("CMYK"), {}),
        "jpeg-exif": ("jpeg", rgb, {"exif": exif.tobytes()}),
        "jpeg-icc": ("jpeg", rgb, {"icc_profile": b"\0" * 60_000}),
        "webp-lossy": ("webp", rgb, {}),
        "webp-lossless": ("webp", rgb, {"lossless": True}),
        "webp-alpha": ("webp", Image.new("RGBA", (width, height), (1, 2, 3, 4)), {}),
        "bmp": ("bmp", rgb, {}),
        "bmp-alpha": ("bmp", Image.new("RGBA", (width, height)), {}),
        "gif": ("gif", rgb, {}),
        "tiff": ("tiff", rgb, {}),
        "tiff-lzw": ("tiff", rgb, {"compression": "tiff_lzw"}),
    }[variant]
    out = io.BytesIO()
    image.save(out, format=fmt.upper(), **options)
    data = out.getvalue()
    assert Image.open(io.BytesIO(data)).size == (width, height)
    return fmt, data


VARIANTS = [
    "png",
    "png-interlaced",
    "png-16bit",
    "jpeg",
    "jpeg-progressive",
    "jpeg-cmyk",
    "jpeg-exif",
    "jpeg-icc",
    "webp-lossy",
    "webp-lossless",
    "webp-alpha",
    "bmp",
    "bmp-alpha",
    "gif",
    "tiff",
    "tiff-lzw",
]
EDGES = [(301, 301), (300, 400), (400, 300), (5999, 2400), (6000, 2500), (1000, 400), (1002, 401), (401, 1002)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("width", "height"), EDGES, ids=[f"{w}x{h}" for w, h in EDGES])
def test_images_from_a_real_encoder_are_judged_by_the_rules(variant: str, width: int, height: int) -> None:
    fmt, data = _encode(variant, width, height)
    allowed = 300 < width < 6000 and 300 < height < 6000 and 0.4 < width / height < 2.5 and len(data) < MAX_BYTES
    uri = data_uri(data, fmt)
    if allowed:
        info = inspect_data_uri(uri)
        assert (info.format, info.width, info.height, info.size_bytes) == (fmt, width, height, len(data))
    else:
        with pytest.raises(ImageError):
            inspect_data_uri(uri)
