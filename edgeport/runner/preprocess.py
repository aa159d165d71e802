"""THE preprocessing implementation: numpy + cv2, Python 3.6 syntax.

The host package (edgeport.preprocess), the calibration set, the parity checks and every
bundle's runner.py all call these functions, so the device computes exactly the arrays the
host validated. ``spec`` is the "preprocess" dict of the manifest (see
edgeport.preprocess.PreprocessSpec.to_dict for its keys).
"""
import cv2
import numpy as np

_INTERP = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA,
           "cubic": cv2.INTER_CUBIC}


def input_hw(spec):
    """(height, width) the model takes, from the spec's shape and layout."""
    shape = spec["shape"]
    if spec["layout"] == "NCHW":
        return int(shape[2]), int(shape[3])
    return int(shape[1]), int(shape[2])


def _resize(img, spec, out_h, out_w):
    """Resize per spec; returns the image and the geometry to map results back."""
    interp = _INTERP[spec.get("interpolation", "linear")]
    h, w = img.shape[:2]
    mode = spec["resize"]
    if mode == "stretch":
        if (h, w) != (out_h, out_w):
            img = cv2.resize(img, (out_w, out_h), interpolation=interp)
        return img, {"mode": mode, "src_hw": [h, w], "box": [0, 0, out_w, out_h]}
    if mode == "letterbox":
        s = min(out_h / float(h), out_w / float(w))
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        resized = cv2.resize(img, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else img
        top, left = (out_h - nh) // 2, (out_w - nw) // 2
        canvas = np.empty((out_h, out_w, img.shape[2]), img.dtype)
        canvas[...] = spec.get("pad_value", 114)
        canvas[top:top + nh, left:left + nw] = resized
        return canvas, {"mode": mode, "src_hw": [h, w], "box": [left, top, left + nw, top + nh]}
    if mode == "shorter-crop":
        short = int(spec.get("resize_size") or round(min(out_h, out_w) / 0.875))
        s = short / float(min(h, w))
        nh, nw = max(out_h, int(round(h * s))), max(out_w, int(round(w * s)))
        resized = cv2.resize(img, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else img
        top, left = (nh - out_h) // 2, (nw - out_w) // 2
        crop = resized[top:top + out_h, left:left + out_w]
        # The box is where the model's view lies in the resized frame, in source pixels.
        box = [left / s, top / s, (left + out_w) / s, (top + out_h) / s]
        return np.ascontiguousarray(crop), {"mode": mode, "src_hw": [h, w], "box": box}
    raise ValueError("unknown resize mode %r" % (mode,))


def preprocess(frame_bgr, spec):
    """Turn one BGR uint8 frame (H, W, 3), as OpenCV delivers it, into the model input.

    Returns (tensor, geometry): tensor has the spec's full shape (batch 1) and dtype
    float32 (quantised inputs are quantised by the runtime, from the model's own
    scale and zero point); geometry maps model pixels back to the frame.

    The frame is resized first and its channels reordered after: a pure channel permutation
    commutes with per-channel resizing, and the small image is cheaper to touch. The
    arithmetic ``(pixel * scale - mean) / std`` runs as ``pixel * a - b`` per channel plane
    (a = scale / std, b = mean / std), which numpy does several times faster than on an
    interleaved (H, W, 3) array.
    """
    if frame_bgr is None or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        raise ValueError("expected an HxWx3 BGR image, got %r" % (getattr(frame_bgr, "shape", None),))
    out_h, out_w = input_hw(spec)
    img, geometry = _resize(frame_bgr, spec, out_h, out_w)
    planes = cv2.split(img)
    if spec["color"] == "RGB":
        planes = planes[::-1]
    scale = float(spec["scale"])
    x = np.empty((3, out_h, out_w), np.float32)
    for c in range(3):
        std = float(spec["std"][c])
        x[c] = planes[c]
        x[c] *= np.float32(scale / std)
        x[c] -= np.float32(float(spec["mean"][c]) / std)
    if spec["layout"] == "NHWC":
        x = x.transpose(1, 2, 0)
    return np.ascontiguousarray(x[None]), geometry


def preprocess_batch(frames_bgr, spec):
    """Preprocess a list of frames into one (N, ...) float32 array."""
    return np.concatenate([preprocess(f, spec)[0] for f in frames_bgr], 0)
