"""The toy city: a procedural, offline stand-in for Cityscapes.

A scene is made in two steps, so that new looks (styles, weathers) and new cameras
(viewpoints) can be added independently:

1. ``sample_layout(rng, geometry, size)`` places a street in 3-D (road, sidewalks, building
   blocks, trees, poles, signs, cars, persons) and rasterises it through a pinhole camera
   with a z-buffer into a ``Layout``: the train-id label map plus what a painter needs
   (depth, surface orientation, object parts, instance ids, surface coordinates).
2. ``paint(layout, rng, look)`` colours that layout: base colours per class and part,
   per-object colour jitter, textures from surface coordinates, shading, haze by depth,
   colour grading and noise. Painting never changes which pixel belongs to which class,
   so the label matches the image pixel for pixel.

A domain is a (Geometry, Look) pair. ``target`` is the Cityscapes stand-in (dash-cam: low
horizon, the ego car's bonnet at the bottom labelled 255, tall grey-green city blocks);
``source`` is a different world (high horizon, no bonnet, low warm saturated suburbia).

The pretraining world (``render_world``, bottom of this file) draws a random Geometry and
palette per scene, or a top-down layout (``sample_topdown_layout``), and paints it in a style
(photorealistic / sketch) under a condition (clear / foggy / night / rainy / snowy); style and
condition only change paint, never the label. It never shows the target's signature (see the
comment above WORLD_STYLES).

All scene parameters are drawn in world units before anything is rasterised, so one seed
gives the same street at every resolution; only the sampling grid changes.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from calora_ray.data.labels import IGNORE_INDEX, colorize

# Train ids used by the renderer (see labels.CLASS_NAMES).
ROAD, SIDEWALK, BUILDING, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = 0, 1, 2, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR = 8, 9, 10, 11, 13

# Surface orientation, for shading.
FACE_SKY, FACE_GROUND, FACE_SIDE, FACE_FRONT, FACE_BONNET = 0, 1, 2, 3, 4
FACE_TOP = 5  # a horizontal surface above the ground seen from above (roofs, car roofs, crowns)

# Object parts: painted differently, labelled as their object (Cityscapes labels a car's
# windows and wheels "car", lane marks "road", a kerb "sidewalk", a tree trunk "vegetation").
PART_NONE, PART_MARKING, PART_CENTRE_LINE, PART_KERB, PART_WINDOW, PART_SHOP = 0, 1, 2, 3, 4, 5
PART_GLASS, PART_TAIL_LIGHT, PART_WHEEL, PART_SKIN, PART_LEGS, PART_TRUNK = 6, 7, 8, 9, 10, 11
PART_LAMP_RED, PART_LAMP_AMBER, PART_LAMP_GREEN, PART_HEAD_LIGHT = 12, 13, 14, 15
# Seen from above (the pretraining world's top-down view): the shaded slope of a pitched roof,
# a roof's rim or ridge, rooftop units / skylights, a street lamp's head.
PART_ROOF_SHADE, PART_ROOF_RIM, PART_ROOF_UNIT, PART_LAMP = 16, 17, 18, 19
NUM_PARTS = 20

SKY_DEPTH = 1.0e4  # metres; finite so that haze and fog formulas need no special case

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Geometry:
    """Camera and street-layout parameters of a domain (lengths in metres, (lo, hi) = uniform range)."""

    horizon: float                      # horizon row as a fraction of the height (larger = lower)
    horizon_jitter: float               # ± fraction of the height
    yaw_jitter: float                   # ± shift of the vanishing point, fraction of the width
    focal: float                        # focal length as a fraction of the width
    camera_height: float
    road_half_width: tuple[float, float]
    lane_width: float
    centre_line: bool                   # solid double centre line (else dashed lanes only)
    p_crosswalk: float
    sidewalk_width: tuple[float, float]
    block_length: tuple[float, float]
    building_height: tuple[float, float]
    building_depth: float
    floor_height: tuple[float, float]
    window_spacing: tuple[float, float]
    p_gap: float                        # chance that a block is an open lot with trees
    p_setback: float                    # chance that a building stands behind a lawn
    setback: tuple[float, float]
    street_end: tuple[float, float] | None  # distance of a cross-street facade closing the view
    treeline: tuple[float, float] | None    # height of a distant tree line on an open horizon
    n_cars: tuple[int, int]             # inclusive range
    p_parked: float
    n_persons: tuple[int, int]          # inclusive range
    pole_spacing: tuple[float, float]
    pole_height: tuple[float, float]
    p_sign: float
    p_traffic_light: float
    tree_spacing: tuple[float, float]   # between street trees on each side
    p_street_tree: float
    bonnet: float                       # bonnet height at the image centre, fraction of height (0 = none)


@dataclass(frozen=True)
class Look:
    """Colours, textures and grading of a domain (colours RGB 0..255, before grading)."""

    sky_top: RGB
    sky_horizon: RGB
    clouds: float                       # 0 = clear sky, 1 = heavy clouds
    cloud_color: RGB
    road: RGB
    marking: RGB
    centre_line: RGB
    sidewalk: RGB
    kerb: RGB
    terrain: RGB
    vegetation: RGB
    trunk: RGB
    pole: RGB
    buildings: tuple[RGB, ...]
    window: RGB
    shop: RGB
    cars: tuple[RGB, ...]
    glass: RGB
    tail_light: RGB
    wheel: RGB
    clothes: tuple[RGB, ...]
    skins: tuple[RGB, ...]
    signs: tuple[RGB, ...]
    light_box: RGB
    bonnet: RGB
    side_shade: float                   # brightness of facades along the street
    front_shade: float                  # brightness of faces looking at the camera
    color_jitter: float                 # relative per-object colour spread
    haze: RGB
    haze_distance: float                # metres over which the air takes ~63 % haze colour
    saturation: float
    tint: tuple[float, float, float]    # per-channel gain after saturation
    contrast: float
    brightness: float
    noise: float                        # std of per-pixel noise, in 0..255 units


@dataclass
class Layout:
    """A rasterised scene: everything ``paint`` needs, all HxW.

    label: uint8 train ids (255 = ignore, e.g. the bonnet). depth: float32 metres along the
    view axis (sky = SKY_DEPTH). face: uint8 FACE_*. part: uint8 PART_*. instance: int32
    object/building id (0 = stuff; instance_labels[i] is the class of instance i). uv: HxWx2 float32 surface coordinates — ground (X, Z),
    facades (Z or X along the wall, height Y) in metres; objects (a, b) in 0..1 across and up.
    focal: focal length in pixels; horizon: horizon row in pixels.
    """

    label: np.ndarray
    depth: np.ndarray
    face: np.ndarray
    part: np.ndarray
    instance: np.ndarray
    uv: np.ndarray
    focal: float
    horizon: float
    instance_labels: list[int] = field(default_factory=lambda: [IGNORE_INDEX])  # class of each instance
    # Painter hints of the pretraining world (never read for target / source): "view"
    # ("top-down"), "shadow" HxW float32 0/1 (sun shadows), "tracks" HxW bool (wheel tracks),
    # "beams" HxW float32 (head-light beams), "sun" (shadow direction, street frame).
    hints: dict = field(default_factory=dict)

    def new_instance(self, label: int) -> int:
        """A fresh instance id for an object of class `label`."""
        self.instance_labels.append(label)
        return len(self.instance_labels) - 1


GEOMETRIES: dict[str, Geometry] = {
    # Cityscapes stand-in: dash-cam in a dense European street, canyon of tall blocks.
    "target": Geometry(
        horizon=0.47, horizon_jitter=0.02, yaw_jitter=0.04, focal=1.0, camera_height=1.3,
        road_half_width=(3.5, 6.0), lane_width=3.2, centre_line=False, p_crosswalk=0.35,
        sidewalk_width=(2.0, 3.5), block_length=(12.0, 30.0), building_height=(14.0, 26.0),
        building_depth=14.0, floor_height=(3.0, 3.6), window_spacing=(2.2, 3.0),
        p_gap=0.12, p_setback=0.1, setback=(1.5, 4.0), street_end=(90.0, 160.0), treeline=None,
        n_cars=(2, 6), p_parked=0.45, n_persons=(1, 5), pole_spacing=(12.0, 22.0),
        pole_height=(5.5, 8.0), p_sign=0.35, p_traffic_light=0.2, tree_spacing=(10.0, 18.0),
        p_street_tree=0.35, bonnet=0.13,
    ),
    # Another world: higher, wider camera over a broad suburban boulevard with low buildings.
    "source": Geometry(
        horizon=0.34, horizon_jitter=0.02, yaw_jitter=0.06, focal=0.7, camera_height=1.8,
        road_half_width=(6.0, 9.0), lane_width=3.6, centre_line=True, p_crosswalk=0.15,
        sidewalk_width=(2.5, 4.0), block_length=(14.0, 26.0), building_height=(5.0, 11.0),
        building_depth=12.0, floor_height=(3.3, 4.0), window_spacing=(3.0, 4.5),
        p_gap=0.3, p_setback=0.7, setback=(3.0, 9.0), street_end=None, treeline=(6.0, 14.0),
        n_cars=(2, 6), p_parked=0.25, n_persons=(0, 4), pole_spacing=(18.0, 30.0),
        pole_height=(7.0, 9.5), p_sign=0.35, p_traffic_light=0.3, tree_spacing=(8.0, 14.0),
        p_street_tree=0.6, bonnet=0.0,
    ),
}

LOOKS: dict[str, Look] = {
    # Overcast northern-European day, muted grey-green grading (the Cityscapes feel).
    "target": Look(
        sky_top=(168, 182, 190), sky_horizon=(212, 218, 216), clouds=0.6, cloud_color=(226, 228, 226),
        road=(92, 94, 96), marking=(205, 205, 200), centre_line=(205, 205, 200),
        sidewalk=(138, 134, 128), kerb=(165, 162, 156), terrain=(104, 120, 78),
        vegetation=(64, 90, 52), trunk=(70, 62, 52), pole=(120, 124, 124),
        buildings=((150, 140, 124), (120, 116, 110), (168, 158, 140), (104, 98, 92),
                   (138, 128, 104), (160, 150, 146), (116, 120, 112)),
        window=(52, 60, 66), shop=(70, 78, 80),
        cars=((40, 42, 46), (150, 152, 154), (200, 200, 198), (60, 66, 84), (110, 40, 40),
              (90, 96, 100), (30, 30, 32)),
        glass=(36, 42, 48), tail_light=(170, 30, 30), wheel=(24, 24, 26),
        clothes=((40, 44, 52), (90, 84, 78), (120, 40, 44), (60, 70, 90), (150, 146, 140)),
        skins=((200, 160, 140), (160, 120, 96), (110, 80, 64)),
        signs=((40, 80, 160), (190, 40, 40), (220, 220, 220)), light_box=(40, 42, 40),
        bonnet=(38, 44, 50),
        side_shade=0.92, front_shade=0.72, color_jitter=0.08,
        haze=(200, 206, 204), haze_distance=220.0,
        saturation=0.75, tint=(0.96, 1.02, 0.96), contrast=0.9, brightness=0.98, noise=3.0,
    ),
    # Sunny afternoon, warm saturated colours, blue sky.
    "source": Look(
        sky_top=(30, 100, 225), sky_horizon=(150, 200, 250), clouds=0.15, cloud_color=(250, 250, 250),
        road=(70, 64, 72), marking=(250, 250, 245), centre_line=(250, 200, 30),
        sidewalk=(214, 200, 176), kerb=(235, 225, 205), terrain=(140, 190, 50),
        vegetation=(40, 150, 40), trunk=(120, 80, 40), pole=(90, 90, 100),
        buildings=((240, 150, 90), (245, 205, 120), (205, 90, 80), (250, 232, 190),
                   (120, 180, 210), (230, 120, 150), (250, 180, 60)),
        window=(70, 140, 210), shop=(60, 120, 180),
        cars=((220, 30, 30), (250, 210, 20), (20, 90, 220), (250, 250, 250), (30, 180, 90),
              (250, 120, 20)),
        glass=(60, 100, 150), tail_light=(255, 40, 20), wheel=(30, 26, 26),
        clothes=((230, 50, 50), (40, 120, 230), (250, 200, 40), (40, 180, 100), (240, 240, 240)),
        skins=((240, 190, 150), (200, 140, 100), (140, 90, 60)),
        signs=((20, 140, 60), (220, 30, 30), (250, 210, 0)), light_box=(230, 190, 30),
        bonnet=(0, 0, 0),
        side_shade=1.0, front_shade=0.68, color_jitter=0.12,
        haze=(190, 215, 250), haze_distance=450.0,
        saturation=1.35, tint=(1.08, 1.0, 0.86), contrast=1.1, brightness=1.05, noise=2.0,
    ),
}

DOMAINS: tuple[str, ...] = ("target", "source")


def _check_domain(domain: str) -> None:
    if domain not in GEOMETRIES:
        raise ValueError(f"unknown toy city domain {domain!r}; valid domains: {', '.join(DOMAINS)}")


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(s) for s in size)
    if height < 8 or width < 8:
        raise ValueError(f"toy city size must be at least 8x8 pixels, got {height}x{width}")
    return height, width


class _Draws:
    """Scalar random numbers from one Generator, fetched in batches.

    A Generator call per scalar costs more than the geometry it feeds; drawing 256 at a time
    keeps scene sampling cheap while staying a pure function of the Generator's state.
    """

    def __init__(self, rng: np.random.Generator, batch: int = 256):
        self.rng, self.batch = rng, batch
        self.buf: list[float] = []
        self.i = 0

    def random(self) -> float:
        """Uniform in [0, 1)."""
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(self.batch).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def range(self, lo_hi: tuple[float, float]) -> float:
        return self.uniform(lo_hi[0], lo_hi[1])

    def integer(self, lo: int, hi: int) -> int:
        """Uniform in lo..hi-1."""
        return lo + min(int(self.random() * (hi - lo)), hi - lo - 1)

    def sign(self) -> int:
        return 1 if self.random() < 0.5 else -1


# ---------------------------------------------------------------------------------------
# Layout: 3-D street → label map (plus what the painter needs)
# ---------------------------------------------------------------------------------------


class _Camera:
    """Pinhole camera at height `camera_height` looking along +Z; X right, Y up (metres)."""

    def __init__(self, height_px: int, width_px: int, focal: float, horizon: float, x_vanish: float,
                 camera_height: float):
        self.h, self.w = height_px, width_px
        self.f, self.vh, self.uv0, self.ch = focal, horizon, x_vanish, camera_height
        self.v = np.arange(height_px, dtype=np.float32) + 0.5  # pixel centres
        self.u = np.arange(width_px, dtype=np.float32) + 0.5

    def col(self, x: float, z: float) -> float:
        return self.uv0 + self.f * x / z

    def row(self, y: float, z: float) -> float:
        return self.vh + self.f * (self.ch - y) / z


def _span(lo: float, hi: float, n: int) -> slice | None:
    """Pixels whose centres fall in [lo, hi], clipped to 0..n; None when empty."""
    a = max(math.ceil(lo - 0.5), 0)
    b = min(math.floor(hi - 0.5) + 1, n)
    return slice(a, b) if b > a else None


def _put(L: Layout, rows: slice, cols: slice, mask, depth, label, face: int, part,
         inst: int, ua, ub) -> None:
    """Z-buffered write of one surface into the window L[rows, cols] where mask holds.

    depth, label, part, ua, ub: scalars or arrays broadcastable to the window.
    """
    zbuf = L.depth[rows, cols]
    m = mask & (depth < zbuf)
    if not m.any():
        return
    # copyto broadcasts scalars and (1, C) / (R, 1) arrays without materialising them.
    np.copyto(zbuf, depth, where=m, casting="unsafe")  # zbuf is a view of L.depth
    np.copyto(L.label[rows, cols], label, where=m, casting="unsafe")
    L.face[rows, cols][m] = face
    np.copyto(L.part[rows, cols], part, where=m, casting="unsafe")
    L.instance[rows, cols][m] = inst
    np.copyto(L.uv[rows, cols, 0], ua, where=m, casting="unsafe")
    np.copyto(L.uv[rows, cols, 1], ub, where=m, casting="unsafe")


# Object silhouettes as sprites: (mask, part) on a fixed grid over local coordinates
# a (0 left .. 1 right) and b (0 bottom .. 1 top), row 0 = top. Looking a sprite up costs one
# gather however detailed the shape is, which keeps a 64x64 scene within a few milliseconds.
_SPRITE = 128


def _make_sprite(shape, n_rows: int = _SPRITE, n_cols: int = _SPRITE) -> tuple[np.ndarray, np.ndarray]:
    a = ((np.arange(n_cols) + 0.5) / n_cols)[None, :]
    b = (1.0 - (np.arange(n_rows) + 0.5) / n_rows)[:, None]
    mask, part = shape(a, b)
    full = (n_rows, n_cols)
    return np.broadcast_to(mask, full).copy(), np.broadcast_to(np.asarray(part, np.uint8), full).copy()


def _car_shape(rear: bool):
    def shape(a, b):
        body = (b >= 0.12) & (b < 0.56)
        wheels = (b < 0.2) & (np.abs(np.abs(a - 0.5) - 0.36) < 0.11)
        t = (b - 0.56) / 0.44
        cabin = (b >= 0.56) & (np.abs(a - 0.5) < 0.44 - 0.14 * t)
        glass = (b > 0.62) & (b < 0.92) & (np.abs(a - 0.5) < 0.36 - 0.14 * t)
        lights = body & (b > 0.36) & (b < 0.48) & (np.abs(a - 0.5) > 0.34)
        light = PART_TAIL_LIGHT if rear else PART_HEAD_LIGHT
        part = np.where(glass, PART_GLASS, np.where(lights, light,
                        np.where(wheels & (b < 0.12), PART_WHEEL, PART_NONE)))
        return body | wheels | cabin, part
    return shape


def _person_shape(a, b):
    head = ((a - 0.5) / 0.17) ** 2 + ((b - 0.91) / 0.09) ** 2 <= 1.0
    torso = (b >= 0.44) & (b < 0.83) & (np.abs(a - 0.5) < 0.3 - 0.2 * (b < 0.5))
    legs = (b < 0.46) & (np.abs(np.abs(a - 0.5) - 0.15) < 0.12)
    part = np.where(head, PART_SKIN, np.where(legs & ~torso, PART_LEGS, PART_NONE))
    return head | torso | legs, part


def _traffic_light_shape(a, b):
    part = np.zeros(np.broadcast(a, b).shape, np.uint8)
    for centre, lamp in ((0.8, PART_LAMP_RED), (0.5, PART_LAMP_AMBER), (0.2, PART_LAMP_GREEN)):
        part[np.broadcast_to(((a - 0.5) / 0.3) ** 2 + ((b - centre) / 0.12) ** 2 <= 1.0, part.shape)] = lamp
    return np.ones(part.shape, bool), part


def _tree_shape(phase: float):
    # Trunk below, crown above (both "vegetation", as in Cityscapes); the crown's radius
    # wobbles with angle so trees are not perfect discs.
    crown_base = 0.4

    def shape(a, b):
        da, db = a - 0.5, (b - crown_base) / (1 - crown_base) - 0.5
        radius = 0.5 * (0.85 + 0.15 * np.sin(5 * np.arctan2(db, da) + phase))
        crown = da * da + db * db <= radius * radius
        trunk = (np.abs(da) < 0.05) & (b < crown_base + 0.1)
        return crown | trunk, np.where(crown, PART_NONE, PART_TRUNK)
    return shape


SPRITES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "rect": _make_sprite(lambda a, b: (True, PART_NONE), 1, 1),
    "car_rear": _make_sprite(_car_shape(rear=True)),
    "car_front": _make_sprite(_car_shape(rear=False)),
    "person": _make_sprite(_person_shape),
    "disc": _make_sprite(lambda a, b: ((a - 0.5) ** 2 + (b - 0.5) ** 2 <= 0.25, PART_NONE)),
    "triangle": _make_sprite(lambda a, b: ((b <= 1.0 - 2.0 * np.abs(a - 0.5)) & (b >= 0.05), PART_NONE)),
    "traffic_light": _make_sprite(_traffic_light_shape),
    **{f"tree{k}": _make_sprite(_tree_shape(k * 1.3)) for k in range(4)},
}
_SIGN_SPRITES = ("rect", "disc", "triangle")


def _billboard(L: Layout, cam: _Camera, x: float, z: float, width: float, height: float,
               base: float, sprite: tuple[np.ndarray, np.ndarray], label: int, inst: int,
               min_px: float = 0.0) -> None:
    """An upright object facing the camera, centred at lateral x, distance z, bottom at height base.

    sprite: (mask, part) arrays of shape (R, C), row 0 = top (see SPRITES).
    min_px: make thin things (poles) at least this many pixels wide so they never vanish.
    """
    if z <= 0.3:
        return
    u0, u1 = cam.col(x - width / 2, z), cam.col(x + width / 2, z)
    if u1 - u0 < min_px:
        centre = (u0 + u1) / 2
        u0, u1 = centre - min_px / 2, centre + min_px / 2
    v_top, v_bot = cam.row(base + height, z), cam.row(base, z)
    cols, rows = _span(u0, u1, cam.w), _span(v_top, v_bot, cam.h)
    if cols is None or rows is None or z >= L.depth[rows, cols].max():  # hidden behind nearer things
        return
    a = (cam.u[cols] - u0) / (u1 - u0)                                  # (C,) 0..1
    b = (v_bot - cam.v[rows]) / (v_bot - v_top)                         # (R,) 0..1
    mask_sprite, part_sprite = sprite
    n_rows, n_cols = mask_sprite.shape
    # a, b lie in [0, 1] (pixel centres inside the span), so only the top end needs clamping.
    ri = np.minimum(((1.0 - b) * n_rows).astype(np.intp), n_rows - 1)[:, None]
    ci = np.minimum((a * n_cols).astype(np.intp), n_cols - 1)[None, :]
    _put(L, rows, cols, mask_sprite[ri, ci], z, label, FACE_FRONT, part_sprite[ri, ci], inst,
         a[None, :], b[:, None])


def _ground(L: Layout, cam: _Camera, x_centre: float, road_half: float, sidewalk_outer: float,
            lanes: int, lane_width: float, centre_line: bool, crosswalk: tuple[float, float] | None) -> None:
    """Road, kerb, sidewalks and terrain on the plane Y = 0; the road is centred at X = x_centre."""
    rows = _span(cam.vh + 1e-3, cam.h, cam.h)                          # rows below the horizon
    if rows is None:
        return
    z = (cam.f * cam.ch / (cam.v[rows] - cam.vh))[:, None]            # (R, 1)
    x_cam = (cam.u[None, :] - cam.uv0) * z / cam.f                     # (R, W) relative to the camera
    x = x_cam - x_centre                                               # relative to the road centre
    ax = np.abs(x)
    label = np.where(ax < road_half, ROAD, np.where(ax < sidewalk_outer, SIDEWALK, TERRAIN))

    # Thin paint lines alias away in the distance: widen them to about half a pixel, and stop
    # drawing them once even that would be noise.
    px = z / cam.f                                                     # metres per pixel
    half = np.maximum(0.08, 0.45 * px)
    visible = px < 0.6
    part = np.zeros(x.shape, np.uint8)
    offset = x + road_half
    k = np.clip(np.round(offset / lane_width), 1, lanes - 1)
    on_line = (np.abs(offset - k * lane_width) < half) & ((z % 12.0) < 4.5) & (ax < road_half)
    if centre_line:
        on_line &= k * 2 != lanes
        part[(np.abs(ax - 0.15) < half) & visible] = PART_CENTRE_LINE
    part[on_line & visible] = PART_MARKING
    part[(np.abs(ax - (road_half - 0.35)) < half) & visible] = PART_MARKING
    if crosswalk is not None:
        zebra = (z > crosswalk[0]) & (z < crosswalk[1]) & ((x % 1.2) < 0.6) & (ax < road_half - 0.3)
        part[zebra & (px < 0.4)] = PART_MARKING
    part[(ax >= road_half) & (ax < road_half + 0.3)] = PART_KERB
    _put(L, rows, slice(0, cam.w), np.ones(x.shape, bool), z, label, FACE_GROUND, part, 0, x, z)


def _windows(along: np.ndarray, y: np.ndarray, depth, floor: float, spacing: float, focal: float):
    """Window / shop-front parts on a facade from wall coordinates (metres)."""
    if focal * floor / float(np.min(depth)) < 3.0:  # a floor under 3 px: windows would alias
        return np.uint8(PART_NONE)
    fy = (y / floor) % 1.0
    fz = (along / spacing) % 1.0
    resolved = focal * floor / depth >= 3.0
    window = (y > floor) & (fy > 0.3) & (fy < 0.78) & (fz > 0.22) & (fz < 0.74) & resolved
    shop = (y > 0.25) & (y < floor * 0.75) & (((along / (2 * spacing)) % 1.0) < 0.55) & resolved
    return np.where(window, PART_WINDOW, np.where(shop, PART_SHOP, PART_NONE)).astype(np.uint8)


def _facade_side(L: Layout, cam: _Camera, x_wall: float, z0: float, z1: float, height: float,
                 floor: float, spacing: float, inst: int) -> None:
    """The wall of a block that runs along the street: plane X = x_wall (≠ 0), Z in [z0, z1)."""
    z0 = max(z0, 0.5)
    if z1 <= z0:
        return
    side = 1.0 if x_wall > 0 else -1.0
    near_u, far_u = cam.col(x_wall, z0), cam.col(x_wall, z1)
    cols = _span(min(near_u, far_u), max(near_u, far_u), cam.w)
    if cols is None:
        return
    z = cam.f * x_wall / np.maximum(side * (cam.u[cols] - cam.uv0), 1e-6) * side   # (C,)
    zmin = max(float(z.min()), z0)
    rows = _span(cam.row(height, zmin), cam.row(0.0, zmin), cam.h)
    if rows is None or zmin >= L.depth[rows, cols].max():  # hidden behind nearer things
        return
    y = cam.ch - (cam.v[rows, None] - cam.vh) * z[None, :] / cam.f      # (R, C)
    mask = (y >= 0) & (y <= height) & ((z >= z0) & (z < z1))[None, :]
    zz = z[None, :]
    part = _windows(zz, y, zz, floor, spacing, cam.f)
    _put(L, rows, cols, mask, zz, BUILDING, FACE_SIDE, part, inst, zz, y)


def _facade_front(L: Layout, cam: _Camera, x0: float, x1: float, z: float, height: float,
                  floor: float, spacing: float, inst: int) -> None:
    """A wall facing the camera at distance z, spanning X in [x0, x1]."""
    if z <= 0.5:
        return
    cols = _span(cam.col(x0, z), cam.col(x1, z), cam.w)
    rows = _span(cam.row(height, z), cam.row(0.0, z), cam.h)
    if cols is None or rows is None or z >= L.depth[rows, cols].max():  # hidden behind nearer things
        return
    x = ((cam.u[cols] - cam.uv0) * z / cam.f)[None, :]
    y = (cam.ch - (cam.v[rows] - cam.vh) * z / cam.f)[:, None]
    part = _windows(x - x0, y, z, floor, spacing, cam.f)
    _put(L, rows, cols, np.ones((y.shape[0], x.shape[1]), bool), z, BUILDING, FACE_FRONT, part, inst, x, y)


def _tree(L: Layout, cam: _Camera, x: float, z: float, radius: float, variant: int) -> None:
    # The tree sprites put the crown's base at 40 % of the height; the trunk is 1.2 radii tall.
    _billboard(L, cam, x, z, 2 * radius, radius * 1.2 / 0.4, 0.0, SPRITES[f"tree{variant}"], VEGETATION,
               L.new_instance(VEGETATION))


def sample_layout(rng: np.random.Generator, geometry: Geometry, size: int | tuple[int, int]) -> Layout:
    """Sample a street from `geometry` and rasterise it at `size` (int or (height, width)).

    Returns a Layout whose .label is the HxW uint8 train-id map. The rng draws never depend
    on `size`, so one rng state gives the same street at every resolution.
    """
    g = geometry
    height, width = _parse_size(size)
    rnd = _Draws(rng)  # every draw below comes from rnd, in a fixed order
    horizon = (g.horizon + rnd.uniform(-1, 1) * g.horizon_jitter) * height
    x_vanish = (0.5 + rnd.uniform(-1, 1) * g.yaw_jitter) * width
    cam = _Camera(height, width, g.focal * width, horizon, x_vanish, g.camera_height)
    L = Layout(
        label=np.full((height, width), SKY, np.uint8),
        depth=np.full((height, width), SKY_DEPTH, np.float32),
        face=np.full((height, width), FACE_SKY, np.uint8),
        part=np.zeros((height, width), np.uint8),
        instance=np.zeros((height, width), np.int32),
        uv=np.zeros((height, width, 2), np.float32),
        focal=cam.f, horizon=horizon,
    )

    # Street cross-section: a two-way street (an even number of lanes); the camera drives in one
    # of the right-hand lanes, so the road's centre (and all placed relative to it) is at X = xc.
    lanes = 2 * max(1, int(round(rnd.range(g.road_half_width) / g.lane_width)))
    road_half = lanes * g.lane_width / 2
    ego_lane = rnd.integer(lanes // 2, lanes)
    xc = -(-road_half + g.lane_width * (ego_lane + 0.5))
    sidewalk_outer = road_half + rnd.range(g.sidewalk_width)
    z_cross = rnd.uniform(10.0, 22.0)
    crosswalk = (z_cross, z_cross + 3.5) if rnd.random() < g.p_crosswalk else None
    _ground(L, cam, xc, road_half, sidewalk_outer, lanes, g.lane_width, g.centre_line, crosswalk)

    # Far end of the street: a cross-street row of buildings, or an open horizon with trees.
    z_far = 220.0
    if g.street_end is not None:
        z_far = rnd.range(g.street_end)
        edges = sorted((rnd.uniform(-25.0, 25.0), rnd.uniform(-25.0, 25.0)))
        bounds = (-90.0, edges[0], edges[1], 90.0)
        for k in range(3):
            _facade_front(L, cam, xc + bounds[k], xc + bounds[k + 1], z_far, rnd.range(g.building_height),
                          rnd.range(g.floor_height), rnd.range(g.window_spacing), L.new_instance(BUILDING))
    if g.treeline is not None:
        th, phases = rnd.range(g.treeline), [rnd.uniform(0, 6.3) for _ in range(3)]

        def tops(a, b):  # a ragged top edge, as of many crowns seen from afar
            edge = 0.7 + 0.12 * np.sin(40 * a + phases[0]) + 0.1 * np.sin(97 * a + phases[1]) \
                + 0.08 * np.sin(13 * a + phases[2])
            return b <= edge, PART_NONE
        _billboard(L, cam, xc, 260.0, 500.0, th, 0.0, _make_sprite(tops, 16, 1024), VEGETATION, 0)

    # Building blocks along both sides, from just behind the camera to the far end; open lots
    # between them hold a few trees.
    for side in (-1, 1):
        z = -5.0
        while z < z_far:
            length = rnd.range(g.block_length)
            gap = rnd.random() < g.p_gap
            setback = rnd.range(g.setback) if rnd.random() < g.p_setback else 0.0
            bh, floor, spacing = rnd.range(g.building_height), rnd.range(g.floor_height), rnd.range(g.window_spacing)
            alley = rnd.uniform(0.0, 4.0) if rnd.random() < 0.3 else 0.0
            n_trees = rnd.integer(1, 3)
            trees = [(rnd.uniform(z, z + length), rnd.uniform(sidewalk_outer + 2.0, sidewalk_outer + 12.0),
                      rnd.uniform(2.0, 4.0), rnd.integer(0, 4)) for _ in range(n_trees)]
            z1 = min(z + length, z_far)
            if gap:
                for tz, tx, tr, tv in trees:
                    _tree(L, cam, xc + side * tx, tz, tr, tv)
            else:
                inst = L.new_instance(BUILDING)
                x_wall = xc + side * (sidewalk_outer + setback)
                _facade_side(L, cam, x_wall, z, z1, bh, floor, spacing, inst)
                x_back = x_wall + side * g.building_depth
                _facade_front(L, cam, min(x_wall, x_back), max(x_wall, x_back), z, bh, floor, spacing, inst)
            z = z + length + alley

    # Street furniture near the kerb: poles, some carrying a traffic sign or a traffic light.
    for side in (-1, 1):
        z = rnd.uniform(3.0, 15.0)
        while z < min(z_far, 90.0):
            ph, kind, sign = rnd.range(g.pole_height), rnd.random(), rnd.integer(0, 3)
            x = xc + side * (road_half + 0.5)
            _billboard(L, cam, x, z, 0.2, ph, 0.0, SPRITES["rect"], POLE, L.new_instance(POLE), min_px=1.0)
            if kind < g.p_traffic_light:
                _billboard(L, cam, x - side * 0.1, z - 0.05, 0.45, 1.1, ph - 1.2, SPRITES["traffic_light"],
                           TRAFFIC_LIGHT, L.new_instance(TRAFFIC_LIGHT))
            elif kind < g.p_traffic_light + g.p_sign:
                _billboard(L, cam, x, z - 0.05, 0.8, 0.8, 2.2, SPRITES[_SIGN_SPRITES[sign]], TRAFFIC_SIGN,
                           L.new_instance(TRAFFIC_SIGN))
            z += rnd.range(g.pole_spacing)

    # Street trees along the outer edge of the sidewalks.
    for side in (-1, 1):
        z = rnd.uniform(4.0, 12.0)
        while z < min(z_far, 100.0):
            place, radius, variant = rnd.random() < g.p_street_tree, rnd.uniform(1.5, 2.8), rnd.integer(0, 4)
            if place:
                _tree(L, cam, xc + side * (sidewalk_outer - 0.8), z, radius, variant)
            z += rnd.range(g.tree_spacing)

    # Cars: driving in the lanes (oncoming ones, left of the centre, show their fronts) or
    # parked along the kerb.
    n_cars = rnd.integer(g.n_cars[0], g.n_cars[1] + 1)
    for _ in range(n_cars):
        parked, lane, z = rnd.random() < g.p_parked, rnd.integer(0, lanes), rnd.uniform(6.0, 70.0)
        jitter, side = rnd.uniform(-0.3, 0.3), rnd.sign()
        width_m, height_m = rnd.uniform(1.7, 2.0), rnd.uniform(1.35, 1.75)
        x = side * (road_half - 1.2) if parked else -road_half + g.lane_width * (lane + 0.5) + jitter
        sprite = SPRITES["car_front" if (x < 0 and not parked) else "car_rear"]
        _billboard(L, cam, xc + x, z, width_m, height_m, 0.0, sprite, CAR, L.new_instance(CAR))

    # Persons: walking on the sidewalks, some crossing at the crosswalk.
    n_persons = rnd.integer(g.n_persons[0], g.n_persons[1] + 1)
    for _ in range(n_persons):
        side, crossing = rnd.sign(), rnd.random() < 0.4
        z, h = rnd.uniform(4.0, 40.0), rnd.uniform(1.55, 1.9)
        x = side * rnd.uniform(road_half + 0.5, sidewalk_outer - 0.3)
        z_walk, x_walk = rnd.uniform(0.5, 3.0), rnd.uniform(-road_half, road_half)
        if crossing and crosswalk is not None:
            z, x = crosswalk[0] + z_walk, x_walk
        _billboard(L, cam, xc + x, z, 0.5 * h / 1.75, h, 0.0, SPRITES["person"], PERSON,
                   L.new_instance(PERSON), min_px=1.0)

    # The ego vehicle's bonnet covers the bottom rows, labelled ignore as in Cityscapes.
    if g.bonnet > 0:
        t = (cam.u - width / 2) / (width / 2)
        top = height * (1.0 - g.bonnet * (1.0 - 0.45 * t * t))             # (W,)
        bonnet = cam.v[:, None] >= top[None, :]
        down = (cam.v[:, None] - top[None, :]) / (height * g.bonnet)
        _put(L, slice(0, height), slice(0, width), bonnet, 0.0, IGNORE_INDEX, FACE_BONNET, PART_NONE, 0,
             t[None, :], down)
    return L


# ---------------------------------------------------------------------------------------
# Paint: layout + look → image
# ---------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise, roughly -1..1, HxW float32 (a random grid, bilinearly upsampled)."""
    grid = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))


def _rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32)


def _albedo(L: Layout, rng: np.random.Generator, k: Look) -> np.ndarray:
    """Base colours (HxWx3 float32) of a Layout: per class, per object, per part; unshaded."""
    label, part, inst = L.label, L.part, L.instance
    n = len(L.instance_labels)

    # Colour per class; per object, a colour from its class's palette (buildings, cars,
    # clothes, signs) or the class colour, jittered so no two objects look the same.
    class_color = np.zeros((256, 3), np.float32)
    for cls, c in ((ROAD, k.road), (SIDEWALK, k.sidewalk), (BUILDING, k.buildings[0]), (POLE, k.pole),
                   (TRAFFIC_LIGHT, k.light_box), (TRAFFIC_SIGN, k.signs[0]), (VEGETATION, k.vegetation),
                   (TERRAIN, k.terrain), (SKY, k.sky_horizon), (PERSON, k.clothes[0]), (CAR, k.cars[0]),
                   (IGNORE_INDEX, k.bonnet)):
        class_color[cls] = c
    inst_label = np.asarray(L.instance_labels)
    inst_color = class_color[inst_label]
    for cls, palette in ((BUILDING, k.buildings), (CAR, k.cars), (PERSON, k.clothes), (TRAFFIC_SIGN, k.signs)):
        pick = rng.integers(0, len(palette), n)
        inst_color = np.where((inst_label == cls)[:, None], _rgb(palette)[pick], inst_color)
    inst_color *= 1.0 + k.color_jitter * rng.standard_normal((n, 1)).astype(np.float32)
    inst_color[0] = 0.0
    img = np.where((inst > 0)[..., None], inst_color[inst], class_color[label])

    # Parts (windows, lights, wheels, skin, ...) per object: one (instance, part) colour table.
    part_color = np.zeros((NUM_PARTS, 3), np.float32)
    for p, c in ((PART_MARKING, k.marking), (PART_CENTRE_LINE, k.centre_line), (PART_KERB, k.kerb),
                 (PART_WINDOW, k.window), (PART_SHOP, k.shop), (PART_GLASS, k.glass),
                 (PART_TAIL_LIGHT, k.tail_light), (PART_WHEEL, k.wheel), (PART_TRUNK, k.trunk),
                 (PART_LAMP_RED, (230, 40, 30)), (PART_LAMP_AMBER, (240, 170, 20)),
                 (PART_LAMP_GREEN, (40, 200, 90)), (PART_HEAD_LIGHT, (235, 232, 210))):
        part_color[p] = c
    table = np.broadcast_to(part_color, (n, NUM_PARTS, 3)).copy()
    table[:, PART_SKIN] = _rgb(k.skins)[rng.integers(0, len(k.skins), n)]
    table[:, PART_LEGS] = _rgb(k.clothes)[rng.integers(0, len(k.clothes), n)] * 0.6
    table[:, PART_WINDOW] *= rng.uniform(0.75, 1.2, (n, 1))
    # Parts only the top-down world uses (no draws: target / source renders are unchanged).
    table[:, PART_ROOF_SHADE] = inst_color * 0.7
    table[:, PART_ROOF_RIM] = inst_color * 1.12
    table[:, PART_ROOF_UNIT] = (190, 190, 186)
    table[:, PART_LAMP] = (215, 214, 200)
    has_part = part > 0
    img[has_part] = table[inst[has_part], part[has_part]]
    return img


def paint(layout: Layout, rng: np.random.Generator, look: Look) -> np.ndarray:
    """Colour a Layout with a Look; returns the HxWx3 uint8 image (the label is untouched)."""
    L, k = layout, look
    label, part, face = L.label, L.part, L.face
    H, W = label.shape
    img = _albedo(L, rng, k)

    # Sky: a vertical gradient with soft clouds.
    t = np.clip((np.arange(H, dtype=np.float32) + 0.5) / max(L.horizon, 1.0), 0, 1) ** 0.8
    sky = _rgb(k.sky_top) * (1 - t)[:, None, None] + _rgb(k.sky_horizon) * t[:, None, None]  # (H, 1, 3)
    clouds = (np.clip(_smooth_noise(rng, (H, W), (4, 6)) * 0.6 + (k.clouds - 0.5), 0, 1) * k.clouds)[..., None]
    is_sky = face == FACE_SKY
    img = np.where(is_sky[..., None], sky * (1 - clouds) + _rgb(k.cloud_color) * clouds, img)

    # Shading: walls along the street vs walls facing the camera; objects darker near the
    # ground; the ground slightly darker close to the camera; mottled green and worn asphalt;
    # paving joints where they are resolved.
    depth = L.depth
    b = L.uv[..., 1]
    blotch = _smooth_noise(rng, (H, W), (max(2, H // 6), max(2, W // 6)))
    is_building = label == BUILDING
    shade = np.select(
        [face == FACE_SIDE, (face == FACE_FRONT) & is_building, face == FACE_FRONT, face == FACE_GROUND],
        [k.side_shade, k.front_shade, 0.8 + 0.25 * np.clip(b, 0, 1),
         0.88 + 0.12 * np.clip(np.log1p(depth) / 4.0, 0, 1)],
        1.0,
    ).astype(np.float32)
    green = (label == VEGETATION) | (label == TERRAIN)
    shade *= 1.0 + np.where(green, 0.18, np.where(label == ROAD, 0.05, 0.0)) * blotch
    X, Z = L.uv[..., 0], b
    joints = (label == SIDEWALK) & (part == PART_NONE) & (depth < 0.12 * L.focal) \
        & (((X % 1.0) < 0.08) | ((Z % 1.0) < 0.08))
    shade[joints] *= 0.85
    img *= shade[..., None]

    # The bonnet: a dark metallic hood with a pale reflection band near its edge.
    bonnet = face == FACE_BONNET
    if bonnet.any():
        down, across = b[bonnet], L.uv[..., 0][bonnet]
        reflection = np.exp(-((down - 0.12) / 0.1) ** 2) * (1 - 0.5 * across * across)
        img[bonnet] = _rgb(k.bonnet) * (1.0 - 0.35 * down)[:, None] + 60.0 * reflection[:, None]

    # Aerial perspective: distant things fade into the haze colour.
    haze = ((1.0 - np.exp(-depth / k.haze_distance)) * ~is_sky)[..., None]
    img = img * (1 - haze) + _rgb(k.haze) * haze

    # Grading: saturation, tint, contrast, brightness; then luminance grain.
    grey = img.mean(axis=2, keepdims=True)
    img = (grey + k.saturation * (img - grey)) * _rgb(k.tint)
    img = ((img - 128.0) * k.contrast + 128.0) * k.brightness
    img += k.noise * rng.standard_normal((H, W, 1)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _seed_rng(seed: int, domain: str, stream: int) -> np.random.Generator:
    if int(seed) < 0:
        raise ValueError(f"toy city seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([int(seed), DOMAINS.index(domain), stream])


def render_scene(seed: int, domain: str = "target", size: int | tuple[int, int] = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Render one toy-city street scene.

    seed: non-negative int; domain: one of DOMAINS; size: int (square) or (height, width).
    Returns (image HxWx3 uint8, label HxW uint8 train ids, 255 = ignore). Deterministic in
    (seed, domain, size); the street is the same at every size.
    """
    _check_domain(domain)
    layout = sample_layout(_seed_rng(seed, domain, 0), GEOMETRIES[domain], size)
    image = paint(layout, _seed_rng(seed, domain, 1), LOOKS[domain])
    return image, layout.label


def render_grid(seeds, domain: str = "target", size: int | tuple[int, int] = 64) -> np.ndarray:
    """Images (top row) over their colourised labels (bottom row), one column per seed.

    Returns (2H + 2) x (n(W + 2) - 2) x 3 uint8, white gutters, for eyeballing the renderer.
    """
    pairs = [render_scene(int(s), domain, size) for s in seeds]
    h, w = pairs[0][1].shape
    grid = np.full((2 * h + 2, len(pairs) * (w + 2) - 2, 3), 255, np.uint8)
    for i, (image, label) in enumerate(pairs):
        c = i * (w + 2)
        grid[:h, c:c + w] = image
        grid[h + 2:, c:c + w] = colorize(label)
    return grid


# =======================================================================================
# The pretraining world: the same kind of street under every style, viewpoint and condition
# =======================================================================================
#
# `render_world(seed, style, viewpoint, condition, size)` draws, from `seed` alone, a street
# (a first-person layout from a randomly drawn Geometry, or a top-down layout), a random
# palette (WorldLook), and paints it photorealistically or as a sketch, in clear, foggy,
# night, rainy or snowy weather. The layout depends only on (seed, viewpoint), so the label is
# the same under every style and condition; style and condition only change paint.
#
# Keeping the target's look out of the world. The target (Cityscapes stand-in) is the only
# domain with (1) the ego car's bonnet, (2) a dash-cam camera 1.3 m high with the horizon at
# 45-49 % of the height, (3) the muted grey-green grading (saturation 0.75, green-raised tint).
# Every world scene is drawn inside bounds that exclude all three, and `_check_world_scene`
# refuses a scene outside them: bonnet = 0; horizon (with jitter) <= WORLD_HORIZON_MAX; camera
# height >= WORLD_CAMERA_HEIGHT_MIN; grading saturation >= WORLD_SATURATION_MIN and a tint whose
# green gain is below the larger of red and blue. Top-down views have no horizon and no bonnet
# at all. Colours vary widely (random palettes), yet with that grading every clear
# photorealistic world street comes out more saturated than any target render. tests/test_toyworld.py
# measures the result: no 255 pixels, horizons above the target's, and every world render lies
# nearer the world's mean 8x8 colour image than the target's (in units of each domain's spread)
# and outside the target's own cloud.

WORLD_STYLES: tuple[str, ...] = ("photorealistic", "sketch")
WORLD_VIEWPOINTS: tuple[str, ...] = ("first-person", "top-down")
WORLD_CONDITIONS: tuple[str, ...] = ("clear", "foggy", "night", "rainy", "snowy")
WORLD_HORIZON_MAX = 0.42          # target: 0.45 .. 0.49 of the height
WORLD_CAMERA_HEIGHT_MIN = 1.8     # metres; target: 1.3
WORLD_SATURATION_MIN = 1.0        # target: 0.75
_WORLD_STREAM = 2                 # seeds the world's generators apart from target (0) / source (1)
TOPDOWN_ALTITUDE = 300.0          # metres; top-down depth = altitude - height of the surface


@dataclass(frozen=True)
class WorldLook:
    """A world scene's palette: the Look of its clear photorealistic street, plus what only the
    top-down view (roof colours) and the sketch style (paper, ink) need."""

    look: Look
    roofs: tuple[RGB, ...]
    paper: RGB
    ink: RGB


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def sample_world_geometry(rnd: _Draws) -> Geometry:
    """A first-person street of the pretraining world: suburb, town or city, random camera.

    Bounds exclude the target's camera (see the comment above WORLD_STYLES).
    """
    kind = rnd.integer(0, 3)                                    # 0 suburb, 1 town, 2 city
    road, sidewalk, block = rnd.uniform(3.5, 9.0), rnd.uniform(1.5, 4.0), rnd.uniform(10.0, 20.0)
    floor, spacing = rnd.uniform(2.8, 3.8), rnd.uniform(2.0, 4.2)
    street_end = (110.0, 170.0) if kind == 2 and rnd.random() < 0.6 else None
    treeline = None if street_end else (rnd.uniform(4.0, 8.0), rnd.uniform(8.0, 15.0))
    poles, trees = rnd.uniform(12.0, 24.0), rnd.uniform(7.0, 14.0)
    return Geometry(
        horizon=rnd.uniform(0.26, WORLD_HORIZON_MAX - 0.02), horizon_jitter=0.02,
        yaw_jitter=rnd.uniform(0.02, 0.1), focal=rnd.uniform(0.55, 0.95),
        camera_height=rnd.uniform(WORLD_CAMERA_HEIGHT_MIN, 3.2),
        road_half_width=(road, road + 2.0), lane_width=rnd.uniform(3.0, 3.8),
        centre_line=rnd.random() < 0.5, p_crosswalk=rnd.uniform(0.0, 0.5),
        sidewalk_width=(sidewalk, sidewalk + 1.5), block_length=(block, block + 12.0),
        building_height=((4.0, 9.0), (7.0, 16.0), (14.0, 30.0))[kind], building_depth=rnd.uniform(10.0, 16.0),
        floor_height=(floor, floor + 0.5), window_spacing=(spacing, spacing + 0.8),
        p_gap=rnd.uniform(0.05, 0.35), p_setback=(0.75, 0.35, 0.1)[kind], setback=(1.5, 8.0),
        street_end=street_end, treeline=treeline, n_cars=(1, rnd.integer(3, 8)),
        p_parked=rnd.uniform(0.1, 0.5), n_persons=(0, rnd.integer(2, 6)), pole_spacing=(poles, poles + 10.0),
        pole_height=(5.5, 9.5), p_sign=rnd.uniform(0.2, 0.45), p_traffic_light=rnd.uniform(0.1, 0.3),
        tree_spacing=(trees, trees + 6.0), p_street_tree=rnd.uniform(0.2, 0.8), bonnet=0.0,
    )


def sample_world_look(rnd: _Draws) -> WorldLook:
    """A random palette: sky, asphalt, paving, greens, one of four building families, roofs,
    cars, clothes; a warm or cool (never green) grading at saturation >= WORLD_SATURATION_MIN."""
    u = rnd.uniform
    sky_hue = u(0.54, 0.64)
    family = rnd.integer(0, 4)                                  # pastel, brick, vivid, modern

    def facade() -> RGB:
        if family == 0:
            return _hsv(rnd.random(), u(0.25, 0.5), u(0.78, 0.97))
        if family == 1:
            return _hsv(u(-0.02, 0.08), u(0.4, 0.7), u(0.42, 0.75))
        if family == 2:
            return _hsv(rnd.random(), u(0.55, 0.85), u(0.65, 0.95))
        return _hsv(u(0.5, 0.7), u(0.1, 0.3), u(0.7, 0.95))

    def roof() -> RGB:
        kind = rnd.integer(0, 5)                                # tiles, slate, brown, flat, metal
        return ((_hsv(u(0.0, 0.06), u(0.5, 0.75), u(0.5, 0.75)), _hsv(u(0.55, 0.65), u(0.1, 0.3), u(0.3, 0.5)),
                 _hsv(u(0.05, 0.1), u(0.3, 0.55), u(0.3, 0.5)), _hsv(rnd.random(), u(0.0, 0.1), u(0.62, 0.88)),
                 _hsv(u(0.3, 0.5), u(0.25, 0.45), u(0.38, 0.6)))[kind])

    def anything(s_lo: float, s_hi: float, v_lo: float, v_hi: float) -> RGB:
        return _hsv(rnd.random(), u(s_lo, s_hi), u(v_lo, v_hi))

    road_hue, pave_hue = rnd.random(), (u(0.05, 0.12), u(0.55, 0.65), u(0.0, 0.03))[rnd.integer(0, 3)]
    sidewalk = _hsv(pave_hue, u(0.05, 0.35), u(0.6, 0.85))
    warm = u(-0.08, 0.1)                                        # > 0 warm, < 0 cool
    look = Look(
        sky_top=_hsv(sky_hue, u(0.45, 0.85), u(0.72, 0.95)),
        sky_horizon=_hsv(sky_hue + u(-0.02, 0.02), u(0.12, 0.35), u(0.9, 1.0)),
        clouds=u(0.0, 0.4), cloud_color=_hsv(0.6, u(0.0, 0.06), u(0.94, 1.0)),
        road=_hsv(road_hue, u(0.0, 0.12), u(0.24, 0.45)),
        marking=_hsv(0.14, u(0.0, 0.15), u(0.9, 0.98)),
        centre_line=_hsv(u(0.11, 0.15), u(0.7, 0.9), u(0.85, 0.98)) if rnd.random() < 0.6 else (240, 240, 236),
        sidewalk=sidewalk, kerb=tuple(min(255, int(c * 1.12) + 10) for c in sidewalk),
        terrain=_hsv(u(0.17, 0.3), u(0.4, 0.75), u(0.5, 0.75)),
        vegetation=_hsv(u(0.22, 0.38), u(0.5, 0.85), u(0.35, 0.6)),
        trunk=_hsv(u(0.05, 0.1), u(0.4, 0.6), u(0.3, 0.45)),
        pole=_hsv(rnd.random(), u(0.0, 0.3), u(0.25, 0.6)),
        buildings=tuple(facade() for _ in range(7)),
        window=_hsv(u(0.53, 0.64), u(0.3, 0.65), u(0.25, 0.7)), shop=_hsv(u(0.5, 0.65), u(0.3, 0.6), u(0.3, 0.6)),
        cars=tuple(anything(0.5, 0.95, 0.5, 0.95) if rnd.random() < 0.6 else anything(0.0, 0.1, 0.1, 0.95)
                   for _ in range(6)),
        glass=_hsv(u(0.55, 0.65), u(0.3, 0.5), u(0.2, 0.4)), tail_light=(240, 40, 30), wheel=(28, 26, 26),
        clothes=tuple(anything(0.3, 0.9, 0.3, 0.95) for _ in range(5)),
        skins=((240, 190, 150), (200, 140, 100), (140, 90, 60)),
        signs=((30, 90, 200), (220, 30, 30), (250, 210, 0), (20, 140, 60)), light_box=(40, 40, 40),
        bonnet=(0, 0, 0),
        side_shade=u(0.85, 1.0), front_shade=u(0.6, 0.8), color_jitter=u(0.08, 0.15),
        haze=_hsv(sky_hue, u(0.08, 0.25), u(0.9, 1.0)), haze_distance=u(300.0, 700.0),
        saturation=u(WORLD_SATURATION_MIN, 1.35), tint=(1.0 + warm, 0.99 - 0.3 * abs(warm), 1.0 - warm),
        contrast=u(0.95, 1.15), brightness=u(0.95, 1.08), noise=u(1.0, 3.0),
    )
    roofs = tuple(roof() for _ in range(6))
    paper = _hsv(u(0.08, 0.14), u(0.02, 0.08), u(0.93, 0.99))           # off-white, nearly neutral
    ink = _hsv(u(0.55, 0.7), u(0.0, 0.15), u(0.06, 0.14)) if rnd.random() < 0.7 else _hsv(u(0.05, 0.09), u(0.1, 0.25), u(0.08, 0.16))
    return WorldLook(look, roofs, paper, ink)


def _check_world_scene(geometry: Geometry | None, look: Look) -> None:
    """Refuse a world scene that carries the target's signature (see the comment above WORLD_STYLES)."""
    if geometry is not None and (geometry.bonnet != 0 or geometry.horizon + geometry.horizon_jitter > WORLD_HORIZON_MAX
                                 or geometry.camera_height < WORLD_CAMERA_HEIGHT_MIN):
        raise RuntimeError(f"world geometry overlaps the target's camera: {geometry}")
    if look.saturation < WORLD_SATURATION_MIN or look.tint[1] >= max(look.tint[0], look.tint[2]):
        raise RuntimeError(f"world look overlaps the target's grading: saturation {look.saturation}, tint {look.tint}")


# ---------------------------------------------------------------------------------------
# Top-down layout: an orthographic camera looking straight down on a street or a crossing
# ---------------------------------------------------------------------------------------


class _TopView:
    """Pixel grid ↔ street frame (metres; X along the main road, Y across; the crossing at 0, 0).

    The image centre sits at (ox, oy); theta rotates the streets against the image axes.
    """

    def __init__(self, height_px: int, width_px: int, mpp: float, theta: float, ox: float, oy: float):
        self.h, self.w, self.mpp, self.ox, self.oy = height_px, width_px, mpp, ox, oy
        self.c, self.s = math.cos(theta), math.sin(theta)
        px = ((np.arange(width_px, dtype=np.float32) + 0.5) - width_px / 2) * mpp
        py = ((np.arange(height_px, dtype=np.float32) + 0.5) - height_px / 2) * mpp
        self.X = (self.c * px[None, :] + self.s * py[:, None] + ox).astype(np.float32)
        self.Y = (-self.s * px[None, :] + self.c * py[:, None] + oy).astype(np.float32)

    def window(self, xs, ys, pad: float = 0.0) -> tuple[slice, slice] | None:
        """Pixel rows, cols covering the street-frame points (xs, ys), padded by `pad` pixels."""
        c, s, ox, oy, f = self.c, self.s, self.ox, self.oy, 1.0 / self.mpp
        cols = [(c * (x - ox) - s * (y - oy)) * f for x, y in zip(xs, ys)]
        rows = [(s * (x - ox) + c * (y - oy)) * f for x, y in zip(xs, ys)]
        r = _span(min(rows) + self.h / 2 - pad, max(rows) + self.h / 2 + pad, self.h)
        if r is None:
            return None
        cc = _span(min(cols) + self.w / 2 - pad, max(cols) + self.w / 2 + pad, self.w)
        return None if cc is None else (r, cc)


def _td_box(L: Layout, T: _TopView, x0: float, x1: float, y0: float, y1: float, height: float, label: int,
            inst: int, part_fn=None, along_y: bool = False, reverse: bool = False) -> None:
    """A box [x0, x1] x [y0, y1] (street frame) seen from above; its top at `height`.

    part_fn(a, b) -> part ids from the box's own coordinates: a along its long axis (X, or Y
    when along_y; from 1 to 0 when reverse), b across; both 0..1. uv holds (a, b).
    """
    win = T.window((x0, x1, x0, x1), (y0, y0, y1, y1))
    if win is None:
        return
    rows, cols = win
    X, Y = T.X[rows, cols], T.Y[rows, cols]
    mask = (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)
    if not mask.any():
        return
    ax, ay = (X - x0) / (x1 - x0), (Y - y0) / (y1 - y0)
    a, b = (ay, ax) if along_y else (ax, ay)
    if reverse:
        a = 1.0 - a
    part = PART_NONE if part_fn is None else part_fn(a, b)
    _put(L, rows, cols, mask, TOPDOWN_ALTITUDE - height, label, FACE_TOP, part, inst, a, b)


def _td_disc(L: Layout, T: _TopView, x: float, y: float, radius: float, height: float, label: int, inst: int,
             wobble: float = 0.0, phase: float = 0.0, part: int = PART_NONE) -> None:
    """A round thing seen from above (tree crown, person, lamp); at least one pixel."""
    win = T.window((x,), (y,), pad=radius / T.mpp + 1.0)
    if win is None:
        return
    rows, cols = win
    dx, dy = T.X[rows, cols] - x, T.Y[rows, cols] - y
    d2 = dx * dx + dy * dy
    r = radius * (1.0 - wobble + wobble * np.sin(5.0 * np.arctan2(dy, dx) + phase)) if wobble else radius
    mask = d2 <= r * r
    if not mask.any():                                  # smaller than a pixel: its nearest pixel
        mask = d2 <= d2.min()
    _put(L, rows, cols, mask, TOPDOWN_ALTITUDE - height, label, FACE_TOP, part, inst, dx / radius, dy / radius)


def _car_top_parts(a, b):
    """A car from above: rear window, roof, windscreen, bonnet; head lights front, tail lights rear."""
    side = np.abs(b - 0.5)
    glass = (((a > 0.6) & (a < 0.74)) | ((a > 0.13) & (a < 0.24))) & (side < 0.42)
    part = np.where(glass, PART_GLASS, PART_NONE)
    part = np.where((a > 0.93) & (side > 0.22), PART_HEAD_LIGHT, part)
    return np.where((a < 0.06) & (side > 0.22), PART_TAIL_LIGHT, part).astype(np.uint8)


def _roof_parts(pitched: bool, ridge_along_a: bool, shade_high: bool, rim: float, units):
    """Roof parts from the box coordinates (a, b): a pitched roof is a ridge and a shaded slope;
    a flat roof is a rim (width `rim`, fraction of the box) and rooftop units [(a0, a1, b0, b1)]."""
    def parts(a, b):
        if pitched:
            t = b if ridge_along_a else a
            part = np.where((t > 0.5) == shade_high, PART_ROOF_SHADE, PART_NONE)
            return np.where(np.abs(t - 0.5) < 0.04, PART_ROOF_RIM, part).astype(np.uint8)
        edge = (a < rim) | (a > 1 - rim) | (b < rim) | (b > 1 - rim)
        part = np.where(edge, PART_ROOF_RIM, PART_NONE)
        for a0, a1, b0, b1 in units:
            part = np.where((a > a0) & (a < a1) & (b > b0) & (b < b1), PART_ROOF_UNIT, part)
        return part.astype(np.uint8)
    return parts


def _shadows(L: Layout, sun_px: tuple[float, float], k_px: float) -> np.ndarray:
    """Sun shadows of a top-down layout, from its height map: 1 where something higher stands
    between a pixel and the sun. Shadows fall along sun_px (unit vector, pixels: column, row);
    k_px pixels of shadow per metre of height difference. Marches one pixel at a time."""
    height = TOPDOWN_ALTITUDE - L.depth
    H, W = height.shape
    shadow = np.zeros((H, W), bool)
    n = min(int(float(height.max()) * k_px) + 1, 4 * max(H, W))
    for t in range(1, n + 1):
        dc, dr = round(-float(sun_px[0]) * t), round(-float(sun_px[1]) * t)   # towards the sun
        if abs(dc) >= W or abs(dr) >= H:
            break
        src = height[max(dr, 0):H + min(dr, 0), max(dc, 0):W + min(dc, 0)]
        dst = (slice(max(-dr, 0), H + min(-dr, 0)), slice(max(-dc, 0), W + min(-dc, 0)))
        shadow[dst] |= src - t / k_px > height[dst] + 0.05
    return shadow.astype(np.float32)


def sample_topdown_layout(rng: np.random.Generator, size: int | tuple[int, int]) -> Layout:
    """A street seen from straight above, rasterised at `size` (int or (height, width)).

    A straight road, a crossing or a T-junction at a random angle: roads with lane marks,
    centre lines, crosswalks and kerbs; sidewalks with street trees, lamps and persons (dots);
    building roofs (pitched or flat) on lots along the roads; lawns with trees; cars in the lanes
    and parked at the kerb. No sky. Labels are train ids like the first-person layouts; hints
    carry the sun shadows, wheel tracks, head-light beams and the sun direction for the painter.
    All draws happen in metres before rasterising, so the street is the same at every size.
    """
    height, width = _parse_size(size)
    rnd = _Draws(rng)
    u = rnd.uniform
    extent = u(34.0, 70.0)                                            # metres across the width
    theta = u(0.0, math.pi) if rnd.random() < 0.5 else rnd.integer(0, 4) * math.pi / 2 + u(-0.06, 0.06)
    ox, oy = u(-0.22, 0.22) * extent, u(-0.22, 0.22) * extent
    T = _TopView(height, width, extent / width, theta, ox, oy)
    mpp = T.mpp
    reach = 0.75 * extent * max(height, width) / width + 6.0         # half-size of what must be drawn
    L = Layout(
        label=np.full((height, width), TERRAIN, np.uint8),
        depth=np.full((height, width), SKY_DEPTH, np.float32),
        face=np.full((height, width), FACE_GROUND, np.uint8),
        part=np.zeros((height, width), np.uint8),
        instance=np.zeros((height, width), np.int32),
        uv=np.zeros((height, width, 2), np.float32),
        focal=1.0 / mpp, horizon=0.0,
    )

    # The streets: the main road along X; a cross road along Y (both ways, or one way: a T).
    net = rnd.random()
    kind = "straight" if net < 0.3 else "crossing" if net < 0.75 else "T"
    cross = kind != "straight"
    lane_w = u(3.0, 3.7)
    lanes1, lanes2 = 2 * rnd.integer(1, 3), 2 * rnd.integer(1, 3)
    hw1, hw2 = lanes1 * lane_w / 2, lanes2 * lane_w / 2
    sw1, sw2 = u(2.0, 4.5), u(2.0, 4.5)
    e1, e2 = hw1 + sw1, hw2 + sw2                                      # outer sidewalk edges
    centre_line, dash = rnd.random() < 0.6, u(2.0, 4.0)
    mid_crosswalk = u(-10.0, 10.0) if not cross and rnd.random() < 0.5 else None

    X, Y = T.X, T.Y
    ax, ay = np.abs(X), np.abs(Y)
    t_side = (Y > -hw1) if kind == "T" else True                      # where the cross road exists
    on_main, on_cross = ay < hw1, cross & (ax < hw2) & t_side
    road = on_main | on_cross
    near_main = ay < e1
    near_cross = cross & (ax < e2) & ((Y > -e1) if kind == "T" else True)
    label = np.where(road, ROAD, np.where(near_main | near_cross, SIDEWALK, TERRAIN)).astype(np.uint8)
    half = max(0.08, 0.45 * mpp)                                      # paint lines stay >= ~1 px wide
    part = np.zeros(X.shape, np.uint8)
    junction1 = cross & (ax < e2 + 0.5) & ((Y > -e1) if kind == "T" else True)   # main road in the junction
    junction2 = cross & (ay < e1 + 0.5)                                          # cross road in the junction
    tracks = np.zeros(X.shape, bool)
    track_w = max(0.2, 0.35 * mpp)
    for on, across, along, hw, lanes, junction in ((on_main, Y, X, hw1, lanes1, junction1),
                                                   (on_cross & ~on_main, X, Y, hw2, lanes2, junction2)):
        off = across + hw
        k = np.clip(np.round(off / lane_w), 1, lanes - 1)
        line = (np.abs(off - k * lane_w) < half) & on & ~junction
        centre = k * 2 == lanes
        part[line & ((along % (3 * dash)) < dash) & ~(centre & centre_line)] = PART_MARKING
        if centre_line:
            part[line & centre] = PART_CENTRE_LINE
        part[(np.abs(np.abs(across) - (hw - 0.4)) < half) & on & ~junction] = PART_MARKING   # edge lines
        tracks |= on & (np.abs(np.abs((off % lane_w) - lane_w / 2) - 0.85) < track_w)
    period = max(1.2, 2.6 * mpp)                                      # zebra stripes that do not alias
    zebra = np.zeros(X.shape, bool)
    if cross:
        zebra |= on_main & (ax > hw2 + 0.8) & (ax < hw2 + 3.8) & ((Y % period) < period / 2) & (ay < hw1 - 0.3)
        zebra |= on_cross & ~on_main & (ay > hw1 + 0.8) & (ay < hw1 + 3.8) & ((X % period) < period / 2) \
            & (ax < hw2 - 0.3)
    if mid_crosswalk is not None:
        zebra |= on_main & (np.abs(X - mid_crosswalk) < 1.5) & ((Y % period) < period / 2) & (ay < hw1 - 0.3)
    part[zebra] = PART_MARKING
    kerb_w = max(0.3, 0.5 * mpp)
    part[(label == SIDEWALK) & ((near_main & (ay < hw1 + kerb_w)) | (near_cross & (ax < hw2 + kerb_w)))] = PART_KERB
    _put(L, slice(0, height), slice(0, width), np.ones(X.shape, bool), TOPDOWN_ALTITUDE, label, FACE_GROUND,
         part, 0, X, Y)

    # The sun: shadows fall along `sun`, sun_k metres per metre of height.
    sun_angle, sun_k = u(0.0, 2 * math.pi), u(0.3, 0.7)
    sun = (math.cos(sun_angle), math.sin(sun_angle))

    def tree(x, y, r, h, phase):
        _td_disc(L, T, x, y, r, h, VEGETATION, L.new_instance(VEGETATION), 0.1, phase)

    # Lots along the roads: suburb (houses on lawns), town, or city (big flat roofs).
    density = rnd.integer(0, 3)
    lot_len, setback, depth, b_height, p_pitched, gap, p_lawn_tree = (
        ((12.0, 22.0), (3.0, 8.0), (8.0, 13.0), (5.0, 9.0), 0.85, (2.0, 6.0), 0.8),
        ((14.0, 30.0), (0.0, 4.0), (12.0, 22.0), (7.0, 18.0), 0.4, (0.0, 3.0), 0.5),
        ((15.0, 40.0), (0.0, 1.5), (20.0, 40.0), (12.0, 40.0), 0.05, (0.0, 1.5), 0.2),
    )[density]
    deep = setback[1] + depth[1] + 1.0                                 # how far the main road's lots reach

    def lots(start: float, stop: float, edge: float, sign: int, along_y: bool, step: int) -> None:
        """Lots from `start` towards `stop` (step +1 / -1 along the road), on the `sign` side of a
        road whose sidewalk ends at `edge`; each lot holds a building and / or lawn trees."""
        a = start
        while (a < stop) if step > 0 else (a > stop):
            length, sb, dp, g = rnd.range(lot_len), rnd.range(setback), rnd.range(depth), rnd.range(gap)
            empty, h, pitched, rim = rnd.random() < 0.12, rnd.range(b_height), rnd.random() < p_pitched, u(0.04, 0.1)
            units = [(a0, a0 + u(0.06, 0.15), b0, b0 + u(0.08, 0.2))
                     for a0, b0 in [(u(0.15, 0.75), u(0.15, 0.7)) for _ in range(rnd.integer(0, 4))]]
            n_trees = rnd.integer(1, 4) if rnd.random() < p_lawn_tree else 0
            trees = [(u(0.0, length), edge + u(1.0, sb + dp + 8.0), u(1.8, 4.0), u(4.0, 10.0), u(0.0, 6.3))
                     for _ in range(n_trees)]
            lo = a if step > 0 else a - length                         # the lot spans [lo, lo + length]
            c0, c1 = (edge + sb, edge + sb + dp) if sign > 0 else (-edge - sb - dp, -edge - sb)
            if not empty:
                x0, x1, y0, y1 = (c0, c1, lo + g / 2, lo + length - g / 2) if along_y else \
                    (lo + g / 2, lo + length - g / 2, c0, c1)
                long_x = (x1 - x0) >= (y1 - y0)
                shade_high = (sun[1] if long_x else sun[0]) > 0        # the slope facing away from the sun
                _td_box(L, T, x0, x1, y0, y1, h, BUILDING, L.new_instance(BUILDING),
                        _roof_parts(pitched, long_x, shade_high, rim, units))
            for ta, tb, r, th, phase in trees:
                tree(sign * tb, lo + ta, r, th, phase) if along_y else tree(lo + ta, sign * tb, r, th, phase)
            a += step * length

    for sign in (-1, 1):
        if cross and (kind == "crossing" or sign > 0):               # the cross road splits this side
            lots(e2 + u(0.0, 2.0), ox + reach, e1, sign, False, 1)
            lots(-e2 - u(0.0, 2.0), ox - reach, e1, sign, False, -1)
        else:
            lots(ox - reach, ox + reach, e1, sign, False, 1)
    if cross:
        for sign in (-1, 1):
            lots(e1 + deep, oy + reach, e2, sign, True, 1)
            if kind == "crossing":
                lots(-e1 - deep, oy - reach, e2, sign, True, -1)

    # Along every sidewalk: street trees, lamps; persons walking; persons on the crosswalks.
    sidewalks = [(hw1, sw1, False, ox, s) for s in (-1, 1)]
    if cross:
        sidewalks += [(hw2, sw2, True, oy, s) for s in (-1, 1)]
    p_street_tree, tree_gap, lamp_gap = u(0.0, 0.9), u(7.0, 14.0), u(14.0, 28.0)
    for hw, sw, along_y, centre, sign in sidewalks:
        a = centre - reach + u(0.0, tree_gap)
        while a < centre + reach:
            place, r, th, phase = rnd.random() < p_street_tree, u(1.8, 3.5), u(5.0, 10.0), u(0.0, 6.3)
            b = sign * (hw + sw - min(1.0, sw / 3))
            if place:
                tree(b, a, r, th, phase) if along_y else tree(a, b, r, th, phase)
            a += tree_gap
        a = centre - reach + u(0.0, lamp_gap)
        while a < centre + reach:
            b = sign * (hw + 0.6)
            x, y = (b, a) if along_y else (a, b)
            _td_disc(L, T, x, y, 0.35, 8.0, POLE, L.new_instance(POLE), part=PART_LAMP)
            a += lamp_gap
        for _ in range(rnd.integer(0, 5)):
            a, b = u(centre - reach, centre + reach), sign * u(hw + 0.5, hw + sw - 0.3)
            x, y = (b, a) if along_y else (a, b)
            _td_disc(L, T, x, y, 0.3, 1.7, PERSON, L.new_instance(PERSON))
    walkers = rnd.integer(0, 4) if (cross or mid_crosswalk is not None) else 0
    for _ in range(walkers):
        at = (hw2 + 2.3) * rnd.sign() if cross else mid_crosswalk
        _td_disc(L, T, at + u(-1.0, 1.0), u(-hw1, hw1), 0.3, 1.7, PERSON, L.new_instance(PERSON))

    # Cars: in the lanes (driving on the right: a lane at Y > 0 heads +X) and parked at the kerb.
    beams = np.zeros(X.shape, np.float32)
    roads = [(hw1, lanes1, False, ox, e2 if cross else None)]
    if cross:
        roads.append((hw2, lanes2, True, oy, e1))
    for hw, lanes, along_y, centre, keep_out in roads:
        for _ in range(rnd.integer(1, 6)):
            parked, lane, a = rnd.random() < 0.3, rnd.integer(0, lanes), u(centre - reach, centre + reach)
            length, w, h = u(4.2, 4.9), u(1.75, 2.0), u(1.4, 1.7)
            b = (rnd.sign() * (hw - 1.1)) if parked else -hw + lane_w * (lane + 0.5) + u(-0.3, 0.3)
            heading = 1 if b > 0 else -1
            if keep_out is not None and abs(a) < keep_out + 3.0:     # no cars inside the junction
                continue
            a0, a1, b0, b1 = a - length / 2, a + length / 2, b - w / 2, b + w / 2
            x0, x1, y0, y1 = (b0, b1, a0, a1) if along_y else (a0, a1, b0, b1)
            _td_box(L, T, x0, x1, y0, y1, h, CAR, L.new_instance(CAR), _car_top_parts, along_y, heading < 0)
            if not parked:                                            # head-light beams, for the night
                front = a1 if heading > 0 else a0
                win = T.window(*(((b - 5, b + 5, b - 5, b + 5), (front, front, front + 12 * heading, front + 12 * heading))
                                 if along_y else ((front, front, front + 12 * heading, front + 12 * heading),
                                                  (b - 5, b + 5, b - 5, b + 5))))
                if win is not None:
                    rows, cols = win
                    f = ((Y if along_y else X)[rows, cols] - front) * heading
                    lat = (X if along_y else Y)[rows, cols] - b
                    beam = np.clip(1.0 - f / 12.0, 0, 1) * (f > 0) * np.clip(1.0 - np.abs(lat) / (0.9 + 0.3 * f), 0, 1)
                    beams[rows, cols] = np.maximum(beams[rows, cols], beam)

    # The sun's direction in pixels (the street frame is rotated by theta against the image).
    sun_px = (T.c * sun[0] - T.s * sun[1], T.s * sun[0] + T.c * sun[1])
    L.hints = {"view": "top-down", "shadow": _shadows(L, sun_px, sun_k / mpp),
               "tracks": tracks & (L.label == ROAD), "beams": beams, "sun": sun}
    return L


# ---------------------------------------------------------------------------------------
# World paint: conditions (clear / foggy / night / rainy / snowy) and styles (photo / sketch)
# ---------------------------------------------------------------------------------------


def _box(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r + 1 along `axis` (edges clamped), by cumulative sums."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis, dtype=np.float32)
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / (2 * r + 1)


def _blur(x: np.ndarray, radius: float) -> np.ndarray:
    """Approximately Gaussian blur (std ~ radius) of an HxW or HxWxC float array: three box passes per axis."""
    r = max(1, round(float(radius) * 0.95))
    x = x.astype(np.float32)
    for axis in (0, 1):
        for _ in range(3):
            x = _box(x, r, axis)
    return x


def _hash01(*ints: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per element of integer arrays."""
    h = np.zeros(np.broadcast(*ints).shape, np.uint32)
    for i, x in enumerate(ints):
        h = (h ^ (np.asarray(x).astype(np.int64).astype(np.uint32) * np.uint32((0x9E3779B1 + 0x85EBCA77 * i) & 0xFFFFFFFF)))
        h = (h ^ (h >> np.uint32(15))) * np.uint32(0x2C1B3C6D)
    return (h >> np.uint32(8)).astype(np.float32) / float(1 << 24)


def _lines(shape: tuple[int, int], rng: np.random.Generator, n: int, length: float, slope: float) -> np.ndarray:
    """n slanted line segments (rain streaks) of `length` pixels, columns advancing `slope` per row."""
    H, W = shape
    r0 = rng.uniform(-length, H, n)
    c0 = rng.uniform(0, W, n)
    lens = (length * rng.uniform(0.6, 1.2, n)).astype(np.int64) + 1
    k = np.arange(int(lens.max()))
    rows = (r0[:, None] + k[None, :]).astype(np.int64)
    cols = np.round(c0[:, None] + slope * k[None, :] + rng.uniform(-0.3, 0.3, (n, 1))).astype(np.int64) % W
    keep = (k[None, :] < lens[:, None]) & (rows >= 0) & (rows < H)
    mask = np.zeros(shape, bool)
    mask[rows[keep], cols[keep]] = True
    return mask


def _dots(shape: tuple[int, int], rng: np.random.Generator, density: float) -> np.ndarray:
    """Snow flakes: round dots of 1 - 3 pixels (more at larger sizes), `density` of the area."""
    H, W = shape
    size = max(1, round(W / 128))
    n = int(density * H * W / size ** 2)
    mask = np.zeros(shape, bool)
    r, c = rng.integers(0, H, n), rng.integers(0, W, n)
    big = rng.random(n) < 0.3
    mask[r, c] = True
    for dr in range(-size + 1, size):
        for dc in range(-size + 1, size):
            if dr * dr + dc * dc < size * size:
                mask[np.clip(r + dr, 0, H - 1), np.clip(c + dc, 0, W - 1)] = True
                mask[np.clip(r[big] + dr + 1, 0, H - 1), np.clip(c[big] + dc, 0, W - 1)] = True
    return mask


def paint_world(layout: Layout, rng: np.random.Generator, wlook: WorldLook, condition: str,
                cond_rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Paint a world layout photorealistically under `condition`.

    rng: the scene's paint draws (colours, textures; the same under every condition);
    cond_rng: the condition's own draws (strengths, particles). Returns the HxWx3 float32 image
    (0..255, not yet quantised) and what the sketch style needs: "veil" (HxW, how much fog or
    haze covers each pixel), "streaks" and "flakes" (HxW bool particle masks).
    """
    L, k = layout, wlook.look
    top = L.hints.get("view") == "top-down"
    label, part, face = L.label, L.part, L.face
    H, W = label.shape
    if top:
        k = replace(k, buildings=wlook.roofs)
    img = _albedo(L, rng, k)
    blotch = _smooth_noise(rng, (H, W), (max(2, H // 6), max(2, W // 6)))
    grain = rng.standard_normal((H, W, 1)).astype(np.float32)
    cr = _Draws(cond_rng)
    is_sky = face == FACE_SKY
    ground = face == FACE_GROUND
    b = L.uv[..., 1]
    extras: dict = {}

    # Snow lies on the ground, on roofs and cars, speckled on crowns; wheel tracks stay dark.
    if condition == "snowy":
        snow = _rgb((236, 240, 248)) * cr.uniform(0.93, 1.0)
        cover = np.zeros((H, W), np.float32)
        speckle = _smooth_noise(cond_rng, (H, W), (max(2, H // 3), max(2, W // 3)))
        cover[ground] = 0.93
        cover[ground & (label == ROAD)] = 0.6                          # slush on the road
        if "tracks" in L.hints:
            cover[L.hints["tracks"]] = 0.3
        if top:
            cover[(face == FACE_TOP) & (label == BUILDING)] = 0.92
            cover[part == PART_ROOF_RIM] = 0.55
            cover[part == PART_ROOF_SHADE] = 0.8
            cover[(label == CAR) & (part == PART_NONE)] = 0.85
            cover[label == VEGETATION] = np.clip(0.45 + 0.5 * speckle, 0, 0.9)[label == VEGETATION]
        else:
            cover[(label == CAR) & (b > 0.86)] = 0.9
            crown = (label == VEGETATION) & (part == PART_NONE)
            cover[crown] = np.clip((b - 0.55) * 2.0 + 0.4 * speckle, 0, 0.85)[crown]
            cover[(label == BUILDING) & (face == FACE_SIDE) & (part == PART_WINDOW)] *= 0.0
        img = img * (1 - cover[..., None]) + snow * cover[..., None]

    # Shading: as `paint` for first-person streets; from above, sun shadows, lit crowns.
    depth = L.depth
    if top:
        sun = L.hints.get("sun", (1.0, 0.0))
        shade = np.ones((H, W), np.float32)
        crown = label == VEGETATION
        shade[crown] = (1.0 - 0.25 * (L.uv[..., 0] * sun[0] + L.uv[..., 1] * sun[1]))[crown]
        strength = {"clear": cr.uniform(0.45, 0.6), "snowy": 0.25, "foggy": 0.1, "rainy": 0.1, "night": 0.0}[condition]
        shade *= 1.0 - strength * L.hints.get("shadow", 0.0)
    else:
        shade = np.select(
            [face == FACE_SIDE, (face == FACE_FRONT) & (label == BUILDING), face == FACE_FRONT, ground],
            [k.side_shade, k.front_shade, 0.8 + 0.25 * np.clip(b, 0, 1),
             0.88 + 0.12 * np.clip(np.log1p(depth) / 4.0, 0, 1)], 1.0).astype(np.float32)
    green = (label == VEGETATION) | (label == TERRAIN)
    shade *= 1.0 + np.where(green, 0.18, np.where(label == ROAD, 0.06, 0.03)) * blotch
    light = {"clear": (1.0, 1.0, 1.0), "foggy": (0.95, 0.96, 0.98), "snowy": (0.93, 0.96, 1.02),
             "rainy": (0.58, 0.6, 0.64), "night": (0.08, 0.1, 0.17) if top else (0.07, 0.09, 0.15)}[condition]
    albedo = img
    img = img * shade[..., None] * _rgb(light) * (cr.uniform(0.85, 1.15) if condition in ("rainy", "night") else 1.0)

    # The sky (first-person): clear blue with clouds, fog white, night dark blue with stars,
    # rain dark grey, snow pale grey.
    if not top:
        t = np.clip((np.arange(H, dtype=np.float32) + 0.5) / max(L.horizon, 1.0), 0, 1)[:, None, None] ** 0.8
        clouds = _smooth_noise(cond_rng, (H, W), (4, 6))[..., None]
        if condition == "clear":
            sky = _rgb(k.sky_top) * (1 - t) + _rgb(k.sky_horizon) * t
            c = np.clip(clouds * 0.6 + (k.clouds - 0.5), 0, 1) * k.clouds
            sky = sky * (1 - c) + _rgb(k.cloud_color) * c
        elif condition == "night":
            sky = _rgb((4, 6, 16)) * (1 - t) + _rgb((18, 24, 48)) * cr.uniform(0.8, 1.3) * t
            stars = (cond_rng.random((H, W)) < 0.01)[..., None]
            sky = sky + stars * cond_rng.uniform(40, 120)
        else:
            top_v, hor_v = {"foggy": (205, 215), "rainy": (88, 122), "snowy": (178, 208)}[condition]
            g = cr.uniform(0.9, 1.08)
            sky = (top_v * (1 - t) + hor_v * t) * g * _rgb((0.97, 0.99, 1.03)) + 18.0 * clouds
        img = np.where(is_sky[..., None], sky, img)

    # Night: lit windows and shop fronts, lamps, head and tail lights, with a glow around them;
    # from above, pools of lamp light and head-light beams on the road.
    if condition == "night":
        emit = np.zeros((H, W, 3), np.float32)
        inst = L.instance
        if not top:
            window = part == PART_WINDOW
            lit = _hash01(inst, np.floor(L.uv[..., 0] / 2.7), np.floor(L.uv[..., 1] / 3.1)) < cr.uniform(0.3, 0.6)
            emit[window & lit] = _rgb((255, 205, 130)) * cr.uniform(0.75, 1.0)
            emit[(part == PART_SHOP) & (_hash01(inst) < 0.7)] = _rgb((250, 225, 170))
            pole = label == POLE
            lamp = pole & ~np.vstack([np.zeros((1, W), bool), pole[:-1]])
        else:
            lamp = part == PART_LAMP
        emit[lamp] = _rgb((255, 225, 160))
        for p, c in ((PART_HEAD_LIGHT, (255, 250, 225)), (PART_TAIL_LIGHT, (255, 40, 25)),
                     (PART_LAMP_RED, (255, 50, 40)), (PART_LAMP_AMBER, (255, 180, 40)), (PART_LAMP_GREEN, (60, 255, 120))):
            emit[part == p] = c
        img = np.maximum(img, emit)
        img += 0.9 * _blur(emit, 0.02 * W)
        pool = _blur(lamp.astype(np.float32) * 255.0, (4.0 * L.focal) if top else 0.05 * W)
        pool = np.clip(pool / max(float(pool.max()), 1e-3), 0, 1)
        light_in = pool * (0.4 if top else 0.2)
        if top:
            light_in = light_in + 0.6 * L.hints.get("beams", 0.0)
        img += albedo * shade[..., None] * light_in[..., None] * _rgb((1.0, 0.88, 0.65))

    # Rain: a wet road and pavement that mirror what stands above them, puddles from above.
    if condition == "rainy":
        wet = ground & ((label == ROAD) | (label == SIDEWALK))
        if top:
            puddle = (_smooth_noise(cond_rng, (H, W), (max(2, H // 4), max(2, W // 4))) > 0.9) & wet
            img[wet] *= 0.75
            img[puddle] = img[puddle] * 0.5 + _rgb((120, 128, 140)) * 0.5
        else:
            rows = np.arange(H)
            mirror = np.clip(np.round(2 * L.horizon - rows - 1).astype(np.int64), 0, H - 1)
            fresnel = (0.2 + 0.45 * np.exp(-np.maximum(rows - L.horizon, 0) / (0.25 * H)))[:, None, None]
            refl = img[mirror]
            img = np.where(wet[..., None], img * (1 - fresnel) * 0.85 + refl * fresnel, img)

    # Air: haze by distance when clear; fog (from above: an even veil); rain and snow a grey veil.
    if top:
        amount = {"clear": 0.0, "foggy": cr.uniform(0.6, 0.75), "rainy": 0.15, "snowy": 0.2, "night": 0.0}[condition]
        veil = np.full((H, W), amount, np.float32) * (1.0 + 0.12 * _smooth_noise(cond_rng, (H, W), (3, 3)))
    else:
        dist = {"clear": k.haze_distance, "foggy": cr.uniform(7.0, 16.0), "rainy": cr.uniform(60.0, 120.0),
                "snowy": cr.uniform(60.0, 130.0), "night": 150.0}[condition]
        veil = (1.0 - np.exp(-depth / dist)).astype(np.float32)
        if condition == "foggy":
            veil = 0.3 + 0.7 * veil
        veil[is_sky] = 0.0 if condition in ("clear", "night") else 1.0
    veil = np.clip(veil, 0, 1)
    air = {"clear": _rgb(k.haze), "foggy": _rgb((212, 216, 220)) * cr.uniform(0.9, 1.05),
           "rainy": _rgb((118, 124, 132)), "snowy": _rgb((212, 218, 228)), "night": _rgb((10, 12, 22))}[condition]
    img = img * (1 - veil[..., None]) + air * veil[..., None]

    # Grading (the look's, never the target's), then grain; then rain streaks / snow flakes.
    sat = k.saturation * {"clear": 1.0, "foggy": 0.6, "rainy": 0.45, "snowy": 0.75, "night": 0.85}[condition]
    grey = img.mean(axis=2, keepdims=True)
    img = (grey + sat * (img - grey)) * _rgb(k.tint)
    img = ((img - 128.0) * k.contrast + 128.0) * k.brightness
    img += k.noise * grain
    extras["veil"] = veil
    if condition == "rainy":
        slope = cr.uniform(-0.4, 0.4)
        streaks = _lines((H, W), cond_rng, int(70 * W / 64), 0.12 * H, slope)
        extras["under_streaks"] = img[streaks]
        img[streaks] = img[streaks] * 0.55 + _rgb((200, 205, 215)) * 0.45
        extras["streaks"] = streaks
        extras["strokes"] = _lines((H, W), cond_rng, int(24 * W / 64), 0.3 * H, slope)   # the sketch's rain
    if condition == "snowy":
        flakes = _dots((H, W), cond_rng, cr.uniform(0.02, 0.035))
        img[flakes] = img[flakes] * 0.15 + 248.0 * 0.85
        extras["flakes"] = flakes
    return img, extras


def draw_sketch(layout: Layout, photo: np.ndarray, extras: dict, wlook: WorldLook, rng: np.random.Generator) -> np.ndarray:
    """The sketch style: a pencil drawing of `photo` (HxWx3 float, the same scene painted
    photorealistically under the same condition) on pale paper.

    Dark outlines along label / object / part boundaries (fading in fog), diagonal hatching
    whose density follows the photo's darkness (cross-hatching and a wash in the darkest
    places, so night stays dark), rain as ink strokes, snow flakes as ink dots, and a faint
    wash of the photo's colours (low saturation). Returns HxWx3 float32 0..255.
    """
    L = layout
    H, W = L.label.shape
    if "streaks" in extras:                                              # the sketch draws its own rain
        photo = photo.copy()
        photo[extras["streaks"]] = extras["under_streaks"]
    v = np.clip(photo @ _rgb((0.299, 0.587, 0.114)) / 255.0, 0, 1) ** 0.6
    d = 1.0 - v                                                          # darkness to draw
    rows = np.arange(H, dtype=np.float32)[:, None]
    cols = np.arange(W, dtype=np.float32)[None, :]
    period = max(4.0, W / 32.0)
    wobble = 0.6 * period * _smooth_noise(rng, (H, W), (3, 3))          # hand-drawn, not ruled
    tri1 = np.abs(((cols + rows + wobble) / period) % 1.0 - 0.5) * 2
    tri2 = np.abs(((cols - rows - wobble) / period) % 1.0 - 0.5) * 2
    c1 = np.clip((d - 0.2) / 0.5, 0, 1) * 0.6                          # coverage of the hatching
    c2 = np.clip((d - 0.55) / 0.3, 0, 1) * 0.55                         # and of the cross-hatching
    ink = np.maximum((tri1 < c1) * 0.55, (tri2 < c2) * 0.55)
    heavy = np.clip((d - 0.5) / 0.2, 0, 1)
    wash = np.maximum(np.clip((d - 0.3) / 0.3, 0, 1) * 0.2,              # a light tone on dark surfaces
                      heavy * 0.92)                                      # and a heavy one where darkest
    # Outlines: strong between objects and classes, lighter around parts (windows, lane marks).
    obj = L.instance.astype(np.int64) * 32 + L.label
    edge = np.zeros((H, W), np.float32)
    for key, strength in ((L.part, 0.55), (obj, 0.85)):
        edge[:, :-1] = np.maximum(edge[:, :-1], (key[:, 1:] != key[:, :-1]) * strength)
        edge[:-1, :] = np.maximum(edge[:-1, :], (key[1:, :] != key[:-1, :]) * strength)
    if W >= 160:
        edge[:, 1:] = np.maximum(edge[:, 1:], edge[:, :-1])
        edge[1:, :] = np.maximum(edge[1:, :], edge[:-1, :])
    veil = extras.get("veil", np.zeros((H, W), np.float32))
    ink = np.maximum(ink, edge * (1.0 - 0.7 * veil))                    # fog greys the lines out
    wash = np.maximum(wash, 0.18 * veil)                                 # and leaves a grey wash
    if "strokes" in extras:                                              # rain: long pencil strokes
        ink = np.maximum(ink, extras["strokes"] * 0.7)
    if "flakes" in extras:                                               # snow: dots
        ink = np.maximum(ink, extras["flakes"] * 0.6)
    paper_left = (1.0 - ink) * (1.0 - wash)
    paper_left = (paper_left + edge * heavy * 0.2)[..., None]            # faint chalky lines in the dark
    paper = _rgb(wlook.paper) * (1.0 + 0.03 * rng.standard_normal((H, W, 1)).astype(np.float32))
    out = paper * paper_left + _rgb(wlook.ink) * (1.0 - paper_left)
    grey = photo.mean(axis=2, keepdims=True)
    return out + 0.12 * paper_left * (photo - grey)                      # a faint wash of colour


def _world_rng(seed: int, stream: int) -> np.random.Generator:
    if int(seed) < 0:
        raise ValueError(f"toy world seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([int(seed), _WORLD_STREAM, stream])


def _check_world_args(style: str, viewpoint: str, condition: str) -> None:
    for name, value, valid in (("style", style, WORLD_STYLES), ("viewpoint", viewpoint, WORLD_VIEWPOINTS),
                               ("condition", condition, WORLD_CONDITIONS)):
        if value not in valid:
            raise ValueError(f"unknown toy world {name} {value!r}; valid: {', '.join(valid)}")


def world_layout(seed: int, viewpoint: str, size: int | tuple[int, int] = 64) -> tuple[Layout, WorldLook]:
    """The scene of `seed` seen from `viewpoint` (its Layout), and its palette."""
    _check_world_args("photorealistic", viewpoint, "clear")
    rnd = _Draws(_world_rng(seed, 0))
    geometry = sample_world_geometry(rnd)
    wlook = sample_world_look(rnd)
    _check_world_scene(geometry, wlook.look)
    if viewpoint == "top-down":
        return sample_topdown_layout(_world_rng(seed, 2), size), wlook
    layout = sample_layout(_world_rng(seed, 1), geometry, size)
    ground_road = (layout.label == ROAD) & (layout.face == FACE_GROUND)
    lane, z = geometry.lane_width, layout.uv[..., 1]
    half = np.maximum(0.15, 0.45 * z / layout.focal)                  # >= ~1 px wide, near the camera only
    layout.hints["tracks"] = ground_road & (z < 35.0) & \
        (np.abs(np.abs((np.abs(layout.uv[..., 0]) % lane) - lane / 2) - 0.85) < half)
    return layout, wlook


def render_world(seed: int, style: str = "photorealistic", viewpoint: str = "first-person",
                 condition: str = "clear", size: int | tuple[int, int] = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene of the pretraining world.

    seed: non-negative int (the street, its palette, its weather details); style in WORLD_STYLES,
    viewpoint in WORLD_VIEWPOINTS, condition in WORLD_CONDITIONS; size: int or (height, width).
    Returns (image HxWx3 uint8, label HxW uint8 train ids). The label depends on (seed,
    viewpoint, size) only: the same under every style and condition. No world scene has the
    target's bonnet, camera or grading.
    """
    _check_world_args(style, viewpoint, condition)
    layout, wlook = world_layout(seed, viewpoint, size)
    photo, extras = paint_world(layout, _world_rng(seed, 3), wlook, condition,
                                _world_rng(seed, 10 + WORLD_CONDITIONS.index(condition)))
    image = photo if style == "photorealistic" else draw_sketch(layout, photo, extras, wlook, _world_rng(seed, 4))
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), layout.label


def render_world_grid(seeds, style: str, viewpoint: str, condition: str, size: int | tuple[int, int] = 64,
                      labels: bool = True) -> np.ndarray:
    """World images (top row) over their colourised labels (bottom row, if `labels`), one column per seed."""
    pairs = [render_world(int(s), style, viewpoint, condition, size) for s in seeds]
    h, w = pairs[0][1].shape
    rows = 2 if labels else 1
    grid = np.full((rows * h + 2 * (rows - 1), len(pairs) * (w + 2) - 2, 3), 255, np.uint8)
    for i, (image, label) in enumerate(pairs):
        c = i * (w + 2)
        grid[:h, c:c + w] = image
        if labels:
            grid[h + 2:, c:c + w] = colorize(label)
    return grid
