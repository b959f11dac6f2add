"""Bad /predict requests with the status each must get: used by tests/test_app.py against
the app and by bench/perf/service_latency.py against a live server (limits: 200 kB body,
1 Mpx, 8 files)."""

from tests.helpers import (animated_gif, bomb_png, exif_rotated_jpeg, image_bytes, multipage_tiff, nan_tiff, polyglot,
                           zip_bytes)


def png(seed=0, **kw):
    return ("x.png", image_bytes(seed=seed, **kw), "image/png")


BAD_PREDICT = [
    ("empty body", dict(content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 422),
    ("not an image", dict(files={"file": ("a.png", b"hello, not an image", "image/png")}), 422),
    ("zero-byte file", dict(files={"file": ("a.png", b"", "image/png")}), 422),
    ("truncated png", dict(files={"file": ("a.png", image_bytes()[:60], "image/png")}), 422),
    ("truncated jpeg", dict(files={"file": ("a.jpg", image_bytes("JPEG", size=(64, 64))[:300], "image/jpeg")}), 422),
    ("too many pixels", dict(files={"file": ("a.png", image_bytes(size=(1200, 1000)), "image/png")}), 413),
    ("body over limit", dict(files={"file": ("a.png", b"\0" * 300_000, "image/png")}), 413),
    ("wrong content type", dict(content=b"abc", headers={"content-type": "text/plain"}), 415),
    ("no content type", dict(content=b"abc"), 415),
    ("misspelled field", dict(files={"files": png()}), 422),
    ("text instead of file", dict(data={"file": "abc"}, files={"file": png()}), 422),
    ("url-encoded form", dict(data={"file": "abc"}), 415),
    ("malformed base64", dict(json={"image_base64": "@@not base64@@"}), 422),
    ("json missing key", dict(json={"image": "aGVsbG8="}), 422),
    ("json not json", dict(content=b"{oops", headers={"content-type": "application/json"}), 422),
    ("decompression bomb", dict(files={"file": ("a.png", bomb_png(), "image/png")}), 413),
    ("10000x1 image", dict(files={"file": ("a.png", image_bytes(size=(10000, 1)), "image/png")}), 200),
    ("svg named png", dict(files={"file": ("a.png", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/png")}), 422),
    ("html named jpg", dict(files={"file": ("a.jpg", b"<html><body>hi</body></html>", "image/jpeg")}), 422),
    ("zip file", dict(files={"file": ("a.png", zip_bytes(), "image/png")}), 422),
    ("1x1 image", dict(files={"file": ("a.png", image_bytes(size=(1, 1)), "image/png")}), 200),
    ("16-bit png", dict(files={"file": ("a.png", image_bytes(mode="I;16"), "image/png")}), 200),
    ("cmyk jpeg", dict(files={"file": ("a.jpg", image_bytes("JPEG", mode="CMYK"), "image/jpeg")}), 200),
    ("animated gif", dict(files={"file": ("a.gif", animated_gif(), "image/gif")}), 200),
    ("multi-page tiff", dict(files={"file": ("a.tif", multipage_tiff(), "image/tiff")}), 200),
    ("exif-rotated jpeg", dict(files={"file": ("a.jpg", exif_rotated_jpeg(), "image/jpeg")}), 200),
    ("png+zip polyglot", dict(files={"file": ("a.png", polyglot(), "image/png")}), 200),
    ("NaN float tiff", dict(files={"file": ("a.tif", nan_tiff(), "image/tiff")}), 200),
    ("text named png", dict(files={"file": ("a.png", b"just some text\n" * 10, "image/png")}), 422),
    ("body far over limit", dict(files={"file": ("a.png", b"\0" * 5_000_000, "image/png")}), 413),
    ("1000 files", dict(files=[("file", ("x.png", b"\x89PNG", "image/png")) for _ in range(1000)]), 413),
    ("too many files", dict(files=[("file", png(i)) for i in range(9)]), 413),
]


# Bad /feedback requests (with a valid token): the memory must not change.
BAD_FEEDBACK = [
    ("empty label", dict(files={"file": png()}, data={"label": ""}), 422),
    ("blank label", dict(files={"file": png()}, data={"label": "   "}), 422),
    ("label index out of range", dict(files={"file": png()}, data={"label": "99"}), 422),
    ("negative label index", dict(files={"file": png()}, data={"label": "-1"}), 422),
    ("label too long", dict(files={"file": png()}, data={"label": "x" * 10_000}), 422),
    ("label with control characters", dict(files={"file": png()}, data={"label": "a\x00b"}), 422),
    ("missing label", dict(files={"file": png()}), 422),
    ("misspelled label field", dict(files={"file": png()}, data={"lable": "Bag"}), 422),
    ("missing file", dict(files={"other": png()}, data={"label": "Bag"}), 422),
    ("label but not an image", dict(files={"file": ("a.png", b"junk", "image/png")}, data={"label": "Bag"}), 422),
    ("json body", dict(json={"image_base64": "aGVsbG8=", "label": "Bag"}), 415),
    ("two labels", dict(files={"file": png()}, data={"label": ["Bag", "Coat"]}), 422),
]
