import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.core.preprocess import ImageError, ImageLimits, ImageTooLarge, decode_image
from service.core.store import InputSpec
from tests.helpers import animated_gif, bomb_png, exif_rotated_jpeg, image_bytes, nan_tiff

GREY = InputSpec(image_size=28, in_chans=1, mean=[0.0], std=[1.0])
RGB = InputSpec(image_size=28, in_chans=3, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_grey_png_round_trips_to_the_same_pixels():
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    x = decode_image(png_of(arr), GREY, ImageLimits())
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x[0], torch.from_numpy(arr).float() / 255)


def test_exif_orientation_is_applied():
    x = decode_image(exif_rotated_jpeg(), GREY, ImageLimits())  # a horizontal ramp, rotated 90 degrees
    col_change = (x[0, -1, :] - x[0, 0, :]).abs().mean()
    row_change = (x[0, :, -1] - x[0, :, 0]).abs().mean()
    assert row_change < col_change  # the ramp now runs down the image


def test_sixteen_bit_is_scaled_not_clipped():
    arr = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)
    x = decode_image(png_of(arr), GREY, ImageLimits())
    assert x.min() == 0 and x.max() == 1 and x.unique().numel() > 200


def test_transparent_pixels_become_black_and_grey_becomes_rgb():
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white but fully transparent
    x = decode_image(png_of(rgba), RGB, ImageLimits())
    assert x.shape == (3, 28, 28) and x.max() == 0
    assert decode_image(image_bytes(), RGB, ImageLimits()).shape == (3, 28, 28)


def test_animated_gif_gives_its_first_frame():
    x = decode_image(animated_gif(), GREY, ImageLimits())
    assert x.max() == 0  # frame 1 is black; later frames are grey and white


@pytest.mark.parametrize("data,kind,code", [(b"", ImageError, "empty_file"), (b"not an image", ImageError, "not_an_image"),
                                            (bomb_png(), ImageTooLarge, "image_too_large"),
                                            (image_bytes()[:50], ImageError, "corrupt_image")])
def test_refusals_name_their_kind_and_code(data, kind, code):
    with pytest.raises(kind) as e:
        decode_image(data, GREY, ImageLimits(max_pixels=1_000_000))
    assert e.value.code == code


def test_nan_and_infinite_pixels_give_finite_input():
    x = decode_image(nan_tiff(), GREY, ImageLimits())
    assert torch.isfinite(x).all()


def test_a_4096_square_16_bit_png_decodes_through_a_box_filter_like_a_full_size_conversion():
    arr = np.zeros((4096, 4096), dtype=np.uint16)
    arr[:2048] = 60000  # top half bright
    x = decode_image(png_of(arr), GREY, ImageLimits())
    assert x.shape == (1, 28, 28)
    assert x[0, :13].min() == 1 and x[0, 15:].max() == 0  # scaled by the image's range, halves kept


def test_a_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    arr = np.kron(small, np.ones((256, 256), dtype=np.uint8))  # 2048x2048 blocks: smooth enough for JPEG
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    full = Image.open(io.BytesIO(buf.getvalue())).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    x = decode_image(buf.getvalue(), GREY, ImageLimits())
    assert (x[0] - torch.from_numpy(np.array(full)).float() / 255).abs().mean() < 0.02
