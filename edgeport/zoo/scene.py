"""Procedural road scenes with pixel-exact labels: the embedded default's data.

This file runs on devices too (it is embedded into every runner.py for the
``synthetic://`` camera), so it keeps Python 3.6 syntax and needs only numpy and cv2.
Everything is drawn with anti-aliasing off, from the same polygons into the image and
the label map, so every label is exact.
"""
import math

import cv2
import numpy as np

SCENE_CLASSES = ["sky", "building", "road", "lane-marking", "pavement", "tree", "car"]
# RGB; CamVid's colours where CamVid has the class.
SCENE_PALETTE = [
    (128, 128, 128),
    (128, 0, 0),
    (128, 64, 128),
    (255, 215, 0),
    (60, 40, 222),
    (128, 128, 0),
    (64, 0, 128),
]
SKY, BUILDING, ROAD, LANE, PAVEMENT, TREE, CAR = range(7)
# Detection classes of render_scene_boxes: per-instance boxes of what is drawn, occlusion included.
DET_CLASSES = ["car", "pedestrian", "sign"]
MIN_BOX_PIXELS = 12  # a box needs this many visible pixels ...
MIN_VISIBLE = 0.35  # ... and this share of its drawn pixels left uncovered


def _fill(img, lab, pts, colour, cls, objects=None):
    """Fill one polygon into the BGR image and the label map (and the instance map of ``objects``, when
    given: (inst map, instance id))."""
    poly = np.round(np.asarray(pts, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(img, [poly], tuple(int(c) for c in colour), lineType=cv2.LINE_8)
    if lab is not None:
        cv2.fillPoly(lab, [poly], int(cls), lineType=cv2.LINE_8)
    if objects is not None:
        cv2.fillPoly(objects[0], [poly], int(objects[1]), lineType=cv2.LINE_8)


def _jitter(rng, colour, amount):
    return np.clip(np.asarray(colour, np.float64) + rng.uniform(-amount, amount, 3), 0, 255)


def render_scene(seed, height=120, width=160, t=0.0):
    """Render one road scene.

    Args:
        seed: scene seed; the same seed and t give the same frame.
        height, width: output size in pixels.
        t: time in seconds; cars and lane dashes move with it (for the synthetic camera).

    Returns:
        (image, labels): BGR uint8 image of shape (height, width, 3) and uint8 class ids
        of shape (height, width), ids indexing SCENE_CLASSES.
    """
    img, lab, _ = _render(seed, height, width, t, False)
    return img, lab


def render_scene_boxes(seed, height=120, width=160, t=0.0):
    """Render one road scene with pedestrians and signs added, and the box of every visible object.

    The same scene as render_scene(seed, ...) with people on the pavement (some crossing) and road signs
    drawn over it from a second random stream; the label map does not show the added objects.

    Returns:
        (image, labels, boxes, classes): boxes (K, 4) float32 x1, y1, x2, y2 in pixels (the tight box of the
        visible pixels, end-exclusive), classes (K,) int64 indexing DET_CLASSES; an object keeps its box when
        at least MIN_BOX_PIXELS pixels and MIN_VISIBLE of it stay visible.
    """
    img, lab, objects = _render(seed, height, width, t, True)
    inst, kinds, drawn = objects
    boxes, classes = [], []
    for k in range(1, len(kinds) + 1):
        ys, xs = np.nonzero(inst == k)
        if xs.size >= MIN_BOX_PIXELS and xs.size >= MIN_VISIBLE * drawn[k - 1]:
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(kinds[k - 1])
    return (img, lab, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64))


def _render(seed, height, width, t, with_objects):
    """(image, labels, objects): objects is (instance map, class per instance, drawn pixels per instance) with
    pedestrians and signs added when ``with_objects``, else None; the random stream of the scene itself is
    the same either way."""
    rng = np.random.RandomState(seed % (2 ** 32))
    h, w = int(height), int(width)
    img = np.zeros((h, w, 3), np.uint8)
    lab = np.zeros((h, w), np.uint8)

    horizon = h * rng.uniform(0.32, 0.5)
    vx = w * rng.uniform(0.35, 0.65)
    # Sky: vertical gradient, bluish on a clear day, grey when overcast.
    overcast = rng.uniform(0, 1)
    top = _jitter(rng, (200, 140, 90) if overcast < 0.6 else (170, 170, 170), 25)
    bottom = _jitter(rng, (235, 205, 180) if overcast < 0.6 else (200, 200, 200), 20)
    ramp = np.linspace(0, 1, max(int(math.ceil(horizon)) + 1, 2))[:, None]
    sky = (top[None, :] * (1 - ramp) + bottom[None, :] * ramp).astype(np.uint8)
    img[: sky.shape[0]] = sky[: h, None, :]
    lab[:] = SKY

    # Ground below the horizon is pavement; the road is drawn over it.
    ground = _jitter(rng, (150, 150, 160), 20)
    _fill(img, lab, [(0, horizon), (w, horizon), (w, h), (0, h)], ground, PAVEMENT)

    # Buildings stand on the horizon line, both sides of the road.
    x = -rng.uniform(0, 20)
    while x < w:
        bw = w * rng.uniform(0.08, 0.25)
        bh = h * rng.uniform(0.08, 0.35)
        base = horizon + rng.uniform(0, 2)
        colour = _jitter(rng, rng.choice([60, 100, 140, 180]) * np.ones(3), 40)
        _fill(img, lab, [(x, base), (x + bw, base), (x + bw, base - bh), (x, base - bh)], colour, BUILDING)
        # Windows: darker rectangles that keep the building label.
        win = np.clip(colour * 0.55, 0, 255)
        for wy in np.arange(base - bh + 3, base - 4, 6):
            for wx in np.arange(x + 3, x + bw - 4, 7):
                if rng.uniform() < 0.7:
                    _fill(img, lab, [(wx, wy), (wx + 3, wy), (wx + 3, wy + 3), (wx, wy + 3)], win, BUILDING)
        x += bw + rng.uniform(0, w * 0.05)

    # Road: a trapezoid from the bottom edge to the vanishing point.
    half_bottom = w * rng.uniform(0.35, 0.7)
    half_top = w * 0.01
    road_colour = _jitter(rng, (90, 90, 95), 15)
    left_b, right_b = vx - half_bottom, vx + half_bottom
    _fill(img, lab, [(left_b, h), (right_b, h), (vx + half_top, horizon), (vx - half_top, horizon)],
          road_colour, ROAD)

    # Lane markings: dashes converging on the vanishing point, moving towards the camera with t.
    lanes = [0.0] if rng.uniform() < 0.5 else [-0.33, 0.33]
    phase = (t * 0.8 + rng.uniform()) % 1.0
    for lane in lanes:
        n = 7
        for i in range(n):
            d0 = ((i + phase) / n) ** 2
            d1 = ((i + phase + 0.45) / n) ** 2
            if d0 >= 1:
                continue
            d1 = min(d1, 1.0)
            y0, y1 = horizon + (h - horizon) * d0, horizon + (h - horizon) * d1
            pts = []
            for d, y in ((d0, y0), (d1, y1)):
                cx = vx + lane * (half_top + (half_bottom - half_top) * d)
                half = max(0.6, 0.025 * w * d)
                pts.append((cx - half, y))
                pts.append((cx + half, y))
            _fill(img, lab, [pts[0], pts[1], pts[3], pts[2]], _jitter(rng, (235, 235, 235), 15), LANE)

    # Trees beside the road: a trunk (tree) and a crown of overlapping circles.
    for _ in range(rng.randint(0, 5)):
        d = rng.uniform(0.05, 0.9)
        side = rng.choice([-1, 1])
        y = horizon + (h - horizon) * d
        cx = vx + side * (half_top + (half_bottom - half_top) * d + rng.uniform(4, 20) * (0.3 + d))
        size = 4 + 22 * d * rng.uniform(0.6, 1.3)
        trunk = _jitter(rng, (40, 60, 90), 10)
        _fill(img, lab, [(cx - size * 0.12, y), (cx + size * 0.12, y), (cx + size * 0.12, y - size * 1.4),
                         (cx - size * 0.12, y - size * 1.4)], trunk, TREE)
        leaf = _jitter(rng, (40, 120, 60), 25)
        for _k in range(4):
            ox, oy = rng.uniform(-0.5, 0.5) * size, rng.uniform(-0.4, 0.3) * size
            r = int(round(size * rng.uniform(0.5, 0.8)))
            centre = (int(round(cx + ox)), int(round(y - size * 1.6 + oy)))
            cv2.circle(img, centre, max(r, 1), tuple(int(c) for c in leaf), -1, lineType=cv2.LINE_8)
            cv2.circle(lab, centre, max(r, 1), TREE, -1, lineType=cv2.LINE_8)

    # Cars on the road, far ones first so near ones cover them; they drift with t.
    cars = []
    for _ in range(rng.randint(0, 4)):
        cars.append((rng.uniform(0.1, 0.95), rng.uniform(-0.7, 0.7), rng.uniform(-0.08, 0.08)))
    inst = np.zeros((h, w), np.int32) if with_objects else None
    kinds, drawn = [], []
    for d, lane_pos, speed in sorted(cars):
        d = min(max(d + speed * t, 0.05), 1.1)
        y = horizon + (h - horizon) * d
        cx = vx + lane_pos * (half_top + (half_bottom - half_top) * d)
        cw = max(3.0, 0.3 * w * d)
        ch = cw * rng.uniform(0.55, 0.8)
        body = _jitter(rng, [(40, 40, 200), (200, 60, 40), (220, 220, 220), (30, 30, 30), (60, 160, 200)]
                       [rng.randint(0, 5)], 20)
        outline = [(cx - cw / 2, y), (cx + cw / 2, y), (cx + cw / 2, y - ch * 0.6),
                   (cx + cw * 0.35, y - ch), (cx - cw * 0.35, y - ch), (cx - cw / 2, y - ch * 0.6)]
        obj = None
        if with_objects:
            kinds.append(0)
            drawn.append(_area(h, w, [outline]))
            obj = (inst, len(kinds))
        _fill(img, lab, outline, body, CAR, obj)
        glass = np.clip(body * 0.35 + 40, 0, 255)
        _fill(img, lab, [(cx - cw * 0.3, y - ch * 0.62), (cx + cw * 0.3, y - ch * 0.62),
                         (cx + cw * 0.25, y - ch * 0.92), (cx - cw * 0.25, y - ch * 0.92)], glass, CAR)
    if with_objects:
        _people_and_signs(np.random.RandomState((seed * 7919 + 17) % (2 ** 32)), img, inst, kinds, drawn, h, w,
                          horizon, vx, half_top, half_bottom)

    # Lighting, weather and sensor noise change pixels, never labels.
    out = img.astype(np.float32)
    gain = rng.uniform(0.6, 1.3)
    bias = rng.uniform(-25, 25)
    out = out * gain + bias
    fog = rng.uniform(0, 1)
    if fog > 0.7:
        rows = np.arange(h, dtype=np.float32)[:, None, None]
        depth = np.clip(1.0 - np.abs(rows - horizon) / (0.6 * h), 0, 1) * (fog - 0.7) / 0.3 * 0.7
        out = out * (1 - depth) + 190.0 * depth
    if rng.uniform() < 0.2:  # rain streaks
        streaks = np.zeros((h, w), np.float32)
        for _ in range(int(w * h / 300)):
            sx, sy = rng.randint(0, w), rng.randint(0, h)
            cv2.line(streaks, (sx, sy), (sx - 2, sy + 6), 1.0, 1)
        out = out * (1 - 0.3 * streaks[:, :, None]) + 200 * 0.3 * streaks[:, :, None]
    out += rng.normal(0, rng.uniform(1, 8), out.shape)
    objects = (inst, kinds, drawn) if with_objects else None
    return np.clip(out, 0, 255).astype(np.uint8), lab, objects


def _area(h, w, polys):
    """Pixels the polygons cover inside an h x w frame."""
    mask = np.zeros((h, w), np.uint8)
    for pts in polys:
        cv2.fillPoly(mask, [np.round(np.asarray(pts, np.float64)).astype(np.int32).reshape(-1, 1, 2)], 1,
                     lineType=cv2.LINE_8)
    return int(mask.sum())


def _person(cx, y, ph):
    """Polygons of a standing person (legs, body, head) with feet at (cx, y), ph tall."""
    pw = ph * 0.32
    legs = [(cx - pw * 0.35, y), (cx - pw * 0.05, y), (cx, y - ph * 0.45), (cx + pw * 0.05, y),
            (cx + pw * 0.35, y), (cx + pw * 0.2, y - ph * 0.5), (cx - pw * 0.2, y - ph * 0.5)]
    body = [(cx - pw * 0.5, y - ph * 0.45), (cx + pw * 0.5, y - ph * 0.45), (cx + pw * 0.4, y - ph * 0.82),
            (cx - pw * 0.4, y - ph * 0.82)]
    r = ph * 0.09
    head = [(cx + r * math.cos(a), y - ph * 0.9 + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 12,
                                                                                         endpoint=False)]
    return [legs, body, head]


def _people_and_signs(rng, img, inst, kinds, drawn, h, w, horizon, vx, half_top, half_bottom):
    """Pedestrians (on the pavement, some crossing the road) and road signs (plate on a pole; the plate is
    the object), far ones first, each into the image and the instance map."""
    items = []
    for _ in range(rng.randint(0, 5)):
        items.append((rng.uniform(0.08, 1.0), 1))
    for _ in range(rng.randint(0, 3)):
        items.append((rng.uniform(0.05, 0.9), 2))
    for d, kind in sorted(items):
        y = horizon + (h - horizon) * d
        edge = half_top + (half_bottom - half_top) * d
        side = rng.choice([-1, 1])
        if kind == 1:
            crossing = rng.uniform() < 0.25
            cx = vx + (rng.uniform(-0.8, 0.8) * edge if crossing else side * (edge + rng.uniform(2, 25) * (0.3 + d)))
            ph = 0.42 * w * d * rng.uniform(0.8, 1.15)
            polys = _person(cx, y, max(ph, 4.0))
            kinds.append(1)
            drawn.append(_area(h, w, polys))
            cloth = _jitter(rng, [(40, 40, 160), (150, 60, 30), (60, 140, 60), (30, 30, 30), (200, 200, 60)]
                            [rng.randint(0, 5)], 25)
            skin = _jitter(rng, (120, 160, 210), 30)
            for pts, colour in zip(polys, (_jitter(rng, (50, 40, 40), 15), cloth, skin)):
                _fill(img, None, pts, colour, 0, (inst, len(kinds)))
        else:
            cx = vx + side * (edge + rng.uniform(3, 15) * (0.3 + d))
            sh = 0.5 * w * d * rng.uniform(0.8, 1.2)
            plate = max(sh * 0.32, 3.0)
            top = y - sh
            _fill(img, None, [(cx - plate * 0.05, y), (cx + plate * 0.05, y), (cx + plate * 0.05, top),
                              (cx - plate * 0.05, top)], (90, 90, 90), 0)
            shape = rng.randint(0, 3)
            if shape == 0:  # round: red rim
                pts = [(cx + plate / 2 * math.cos(a), top - plate / 2 + plate / 2 * math.sin(a))
                       for a in np.linspace(0, 2 * math.pi, 16, endpoint=False)]
                colour = (40, 40, 220)
            elif shape == 1:  # triangle: yellow
                pts = [(cx, top - plate), (cx + plate / 2, top), (cx - plate / 2, top)]
                colour = (40, 200, 230)
            else:  # rectangle: blue
                pts = [(cx - plate / 2, top), (cx + plate / 2, top), (cx + plate / 2, top - plate * 0.8),
                       (cx - plate / 2, top - plate * 0.8)]
                colour = (180, 90, 30)
            kinds.append(2)
            drawn.append(_area(h, w, [pts]))
            _fill(img, None, pts, _jitter(rng, colour, 20), 0, (inst, len(kinds)))


def scene_batch(first_seed, count, height=120, width=160):
    """Render ``count`` scenes with seeds first_seed.. as (N,H,W,3) BGR and (N,H,W) labels."""
    imgs = np.zeros((count, height, width, 3), np.uint8)
    labs = np.zeros((count, height, width), np.uint8)
    for i in range(count):
        imgs[i], labs[i] = render_scene(first_seed + i, height, width)
    return imgs, labs
