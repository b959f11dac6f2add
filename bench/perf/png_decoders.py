"""Where the 16-bit 4096x4096 PNG's CPU goes, and whether any PNG decoder on PyPI meets 50 ms.

The file is hostile_images.py's (`png16_4096` of bench.harness.hostile_files: 32 KB, zeros
with one bright block). CPU time per call in this process (median of 5, after one discarded call): this service's whole
decode (`decode_pixels`: header, Pillow's PNG decode, box filter to 28x28, rescale); Pillow's
PNG decode alone (`Image.load`: inflate, unfilter, unpack 16-bit rows; Pillow's wheels link
zlib-ng); the inflate alone over the file's IDAT stream with the standard library's zlib,
and, where installed (`pip install -e '.[bench]'`), with imagecodecs' zlib-ng and libdeflate;
whole PNG decoders: imagecodecs' libpng and pyspng (libspng).

    .venv/bin/python -m bench.perf.png_decoders
"""

from __future__ import annotations

import argparse
import io
import struct
import tempfile
import zlib
from pathlib import Path

from PIL import Image, features

from bench.harness import cpu_per_call, header, hostile_files, write_record
from service.core.preprocess import ImageLimits, decode_pixels
from service.core.store import InputSpec


def cpu_ms(fn, repeats: int = 5) -> dict:
    """CPU ms of one call, spread of `repeats`, after one discarded call (first-call allocations)."""
    return cpu_per_call(fn, 1, repeats, warmup=1, scale=1e3)


def idat_stream(png: bytes) -> bytes:
    """The concatenated IDAT chunks: the zlib stream of the filtered rows."""
    pos, out = 8, []
    while pos < len(png):
        (n,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        if kind == b"IDAT":
            out.append(png[pos + 8:pos + 8 + n])
        pos += 12 + n
    return b"".join(out)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    m = header({"zlib_ng_in_pillow": features.check_feature("zlib_ng")})
    with tempfile.TemporaryDirectory() as tmp:
        data = hostile_files(Path(tmp))["png16_4096"].read_bytes()
    stream = idat_stream(data)
    raw_size = len(zlib.decompress(stream))
    spec = InputSpec(28, 1, [0.5], [0.5])

    def pillow_load():
        im = Image.open(io.BytesIO(data))
        im.load()

    timings = {"this service's decode (decode_pixels)": cpu_ms(lambda: decode_pixels(data, spec, ImageLimits())),
               "Pillow PNG decode (Image.load)": cpu_ms(pillow_load),
               "inflate: zlib (standard library)": cpu_ms(lambda: zlib.decompress(stream))}
    try:
        import imagecodecs
        timings["inflate: zlib-ng (imagecodecs)"] = cpu_ms(lambda: imagecodecs.zlibng_decode(stream))
        timings["inflate: libdeflate (imagecodecs)"] = cpu_ms(lambda: imagecodecs.deflate_decode(stream, out=raw_size))
        timings["PNG decode: libpng (imagecodecs)"] = cpu_ms(lambda: imagecodecs.png_decode(data))
    except ImportError:
        print("imagecodecs not installed: its rows are skipped")
    try:
        import pyspng
        timings["PNG decode: libspng (pyspng)"] = cpu_ms(lambda: pyspng.load(data))
    except ImportError:
        print("pyspng not installed: its row is skipped")
    for name, t in timings.items():
        print(f"{name:>40}: {t['median']:6.1f} ms (min {t['min']:.1f}, max {t['max']:.1f})", flush=True)
    results = {"file_bytes": len(data), "filtered_bytes": raw_size, "cpu_ms": timings}
    write_record("png-decoders", {}, results, m)


if __name__ == "__main__":
    main()
