"""Runner part: image decoding bounded by pixels, checked from the file's header before anything is decoded.

A PNG of 20000x20000 zeros is about a megabyte and decodes to 1.2 GB: bounding the bytes of an upload does not
bound its memory. ``image_size`` reads the width and height that PNG, JPEG, GIF, BMP, WebP, TIFF, PNM/PAM/PFM,
JPEG 2000, Sun raster and Radiance HDR files declare in their first bytes; ``decode_image`` refuses an image over
``max_pixels`` before OpenCV allocates it. OpenCV's own limit (the OPENCV_IO_MAX_IMAGE_PIXELS variable, read at
its first decode) is set to the same bound by the runner, as a backstop for the formats not parsed here.

Python 3.6 syntax; the standard library, numpy and cv2 only: assembled into each bundle's single runner.py
(edgeport.bundle.RUNNER_PARTS), and imported by the host package for calibration and validation images.
"""
import os
import struct

import cv2
import numpy as np

from edgeport.runner.manifest import RunnerError

DEFAULT_MAX_PIXELS = 40 * 1000 * 1000  # the runner's: 40 MP decodes to 120 MB of BGR, within a Jetson Nano's means
HOST_MAX_PIXELS = 100 * 1000 * 1000  # the build host's, for calibration and validation images
MAX_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers (not DHT, JPG, DAC)


class ImageTooLarge(RunnerError):
    """An image whose header declares more pixels than allowed; ``size`` is (width, height)."""

    def __init__(self, message, size):
        RunnerError.__init__(self, message)
        self.size = size


def _jpeg_size(data):
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
            return None
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _SOF and i + 9 <= len(data):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return (w, h) if h else None  # height 0: declared later (DNL); not known from the header
        i += 2 + length
    return None


def _tiff_size(data):
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return None
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    found = {}
    for k in range(count):
        at = ifd + 2 + 12 * k
        if at + 12 > len(data):
            break
        tag, kind = struct.unpack(order + "HH", data[at:at + 4])
        if tag in (256, 257):
            short = kind == 3
            found[tag] = struct.unpack(order + ("H" if short else "I"), data[at + 8:at + (10 if short else 12)])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm_size(data):
    if data[:2] == b"P7":  # PAM: "WIDTH w" and "HEIGHT h" lines
        found = dict(line.split(None, 1) for line in data[3:512].split(b"\n") if len(line.split(None, 1)) == 2)
        return int(found[b"WIDTH"]), int(found[b"HEIGHT"])
    fields = []
    for line in data[2:256].split(b"\n"):
        fields += line.split(b"#")[0].split()
        if len(fields) >= 2:
            break
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return None


def image_size(data):
    """(width, height) that an image file's header declares, or None when the format is not one parsed here or the
    header is cut short. ``data``: the file's bytes (its first few KB are enough for every format but TIFF)."""
    data = bytes(data[:65536])
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM":
            header = struct.unpack("<I", data[14:18])[0]
            if header == 12:
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                bits = struct.unpack("<I", data[21:25])[0]
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if chunk == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            return None
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"F", b"f"):
            return _pnm_size(data)
        if data[:4] == b"\x59\xa6\x6a\x95":  # Sun raster
            return struct.unpack(">II", data[4:12])
        if data[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000 codestream: SIZ (Xsiz, Ysiz less the offsets)
            x, y, x0, y0 = struct.unpack(">IIII", data[8:24])
            return x - x0, y - y0
        if data[4:12] == b"jP  \r\n\x87\n":  # JPEG 2000 file: the ihdr box holds height, width
            at = data.find(b"ihdr")
            if at > 0:
                h, w = struct.unpack(">II", data[at + 4:at + 12])
                return w, h
            return None
        if data[:2] == b"#?":  # Radiance HDR: a header, a blank line, then "-Y H +X W"
            for line in data.split(b"\n\n", 1)[-1].split(b"\n", 1)[:1]:
                parts = line.split()
                if len(parts) == 4 and parts[0][1:] == b"Y" and parts[2][1:] == b"X":
                    return int(parts[3]), int(parts[1])
            return None
    except (struct.error, ValueError, KeyError):  # cut short, or not numbers where they belong
        return None
    return None


def megapixels(n):
    """'40 MP' for 40,000,000."""
    return "%g MP" % round(n / 1e6, 1)


def check_pixels(data, max_pixels, what="the image"):
    """ImageTooLarge when the header of ``data`` declares more than ``max_pixels`` pixels (0: no bound)."""
    size = image_size(data)
    if max_pixels and size is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLarge("%s is %dx%d (%s), over the limit of %s"
                            % (what, size[0], size[1], megapixels(size[0] * size[1]), megapixels(max_pixels)), size)
    return size


def decode_image(data, max_pixels, flags=cv2.IMREAD_COLOR, what="the image"):
    """The image in ``data`` decoded by OpenCV (BGR for the default flags), or None when OpenCV cannot decode it;
    ImageTooLarge, before decoding, when its header declares more than ``max_pixels`` pixels."""
    if not data:
        return None
    check_pixels(data, max_pixels, what)
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def read_image(path, max_pixels, flags=cv2.IMREAD_COLOR, what=None):
    """decode_image of a file's bytes (None when it cannot be read or decoded)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (IOError, OSError):
        return None
    return decode_image(data, max_pixels, flags, what or os.path.basename(str(path)))


def bound_opencv(max_pixels):
    """Set OpenCV's own decode limit (read at its first decode) to ``max_pixels``, for formats not parsed here."""
    if max_pixels:
        os.environ[MAX_PIXELS_ENV] = str(int(max_pixels))
