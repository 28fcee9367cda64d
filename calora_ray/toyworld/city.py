"""The toy city: a procedural, offline stand-in for Cityscapes, and the drawing primitives every
toy renderer shares.

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

The pretraining world (world_render.py) draws its own Geometry and palette per scene with the
same ``sample_layout``, or a top-down layout (topdown.py), and paints it in a style under a
condition; it never shows the target's signature (see the comment above WORLD_HORIZON_MAX there).

All scene parameters are drawn in world units before anything is rasterised, so one seed
gives the same street at every resolution; only the sampling grid changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

    @classmethod
    def empty(cls, height: int, width: int, label: int, face: int, focal: float, horizon: float) -> "Layout":
        """A layout of one `label` and `face` everywhere, at depth SKY_DEPTH: what a scene draws on."""
        return cls(label=np.full((height, width), label, np.uint8),
                   depth=np.full((height, width), SKY_DEPTH, np.float32),
                   face=np.full((height, width), face, np.uint8), part=np.zeros((height, width), np.uint8),
                   instance=np.zeros((height, width), np.int32), uv=np.zeros((height, width, 2), np.float32),
                   focal=focal, horizon=horizon)

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


def parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(s) for s in size)
    if height < 8 or width < 8:
        raise ValueError(f"toy city size must be at least 8x8 pixels, got {height}x{width}")
    return height, width


class Draws:
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


def pixel_span(lo: float, hi: float, n: int) -> slice | None:
    """Pixels whose centres fall in [lo, hi], clipped to 0..n; None when empty."""
    a = max(math.ceil(lo - 0.5), 0)
    b = min(math.floor(hi - 0.5) + 1, n)
    return slice(a, b) if b > a else None


def put_surface(L: Layout, rows: slice, cols: slice, mask, depth, label, face: int, part,
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
    cols, rows = pixel_span(u0, u1, cam.w), pixel_span(v_top, v_bot, cam.h)
    if cols is None or rows is None or z >= L.depth[rows, cols].max():  # hidden behind nearer things
        return
    a = (cam.u[cols] - u0) / (u1 - u0)                                  # (C,) 0..1
    b = (v_bot - cam.v[rows]) / (v_bot - v_top)                         # (R,) 0..1
    mask_sprite, part_sprite = sprite
    n_rows, n_cols = mask_sprite.shape
    # a, b lie in [0, 1] (pixel centres inside the span), so only the top end needs clamping.
    ri = np.minimum(((1.0 - b) * n_rows).astype(np.intp), n_rows - 1)[:, None]
    ci = np.minimum((a * n_cols).astype(np.intp), n_cols - 1)[None, :]
    put_surface(L, rows, cols, mask_sprite[ri, ci], z, label, FACE_FRONT, part_sprite[ri, ci], inst,
                a[None, :], b[:, None])


def _ground(L: Layout, cam: _Camera, x_centre: float, road_half: float, sidewalk_outer: float,
            lanes: int, lane_width: float, centre_line: bool, crosswalk: tuple[float, float] | None) -> None:
    """Road, kerb, sidewalks and terrain on the plane Y = 0; the road is centred at X = x_centre."""
    rows = pixel_span(cam.vh + 1e-3, cam.h, cam.h)                          # rows below the horizon
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
    put_surface(L, rows, slice(0, cam.w), np.ones(x.shape, bool), z, label, FACE_GROUND, part, 0, x, z)


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
    cols = pixel_span(min(near_u, far_u), max(near_u, far_u), cam.w)
    if cols is None:
        return
    z = cam.f * x_wall / np.maximum(side * (cam.u[cols] - cam.uv0), 1e-6) * side   # (C,)
    zmin = max(float(z.min()), z0)
    rows = pixel_span(cam.row(height, zmin), cam.row(0.0, zmin), cam.h)
    if rows is None or zmin >= L.depth[rows, cols].max():  # hidden behind nearer things
        return
    y = cam.ch - (cam.v[rows, None] - cam.vh) * z[None, :] / cam.f      # (R, C)
    mask = (y >= 0) & (y <= height) & ((z >= z0) & (z < z1))[None, :]
    zz = z[None, :]
    part = _windows(zz, y, zz, floor, spacing, cam.f)
    put_surface(L, rows, cols, mask, zz, BUILDING, FACE_SIDE, part, inst, zz, y)


def _facade_front(L: Layout, cam: _Camera, x0: float, x1: float, z: float, height: float,
                  floor: float, spacing: float, inst: int) -> None:
    """A wall facing the camera at distance z, spanning X in [x0, x1]."""
    if z <= 0.5:
        return
    cols = pixel_span(cam.col(x0, z), cam.col(x1, z), cam.w)
    rows = pixel_span(cam.row(height, z), cam.row(0.0, z), cam.h)
    if cols is None or rows is None or z >= L.depth[rows, cols].max():  # hidden behind nearer things
        return
    x = ((cam.u[cols] - cam.uv0) * z / cam.f)[None, :]
    y = (cam.ch - (cam.v[rows] - cam.vh) * z / cam.f)[:, None]
    part = _windows(x - x0, y, z, floor, spacing, cam.f)
    put_surface(L, rows, cols, np.ones((y.shape[0], x.shape[1]), bool), z, BUILDING, FACE_FRONT, part, inst, x, y)


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
    height, width = parse_size(size)
    rnd = Draws(rng)  # every draw below comes from rnd, in a fixed order
    horizon = (g.horizon + rnd.uniform(-1, 1) * g.horizon_jitter) * height
    x_vanish = (0.5 + rnd.uniform(-1, 1) * g.yaw_jitter) * width
    cam = _Camera(height, width, g.focal * width, horizon, x_vanish, g.camera_height)
    L = Layout.empty(height, width, SKY, FACE_SKY, focal=cam.f, horizon=horizon)

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
        put_surface(L, slice(0, height), slice(0, width), bonnet, 0.0, IGNORE_INDEX, FACE_BONNET, PART_NONE, 0,
                    t[None, :], down)
    return L


# ---------------------------------------------------------------------------------------
# Paint: layout + look → image
# ---------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise, roughly -1..1, HxW float32 (a random grid, bilinearly upsampled)."""
    grid = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))


def rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32)


def albedo_image(L: Layout, rng: np.random.Generator, k: Look) -> np.ndarray:
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
        inst_color = np.where((inst_label == cls)[:, None], rgb(palette)[pick], inst_color)
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
    table[:, PART_SKIN] = rgb(k.skins)[rng.integers(0, len(k.skins), n)]
    table[:, PART_LEGS] = rgb(k.clothes)[rng.integers(0, len(k.clothes), n)] * 0.6
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
    img = albedo_image(L, rng, k)

    # Sky: a vertical gradient with soft clouds.
    t = np.clip((np.arange(H, dtype=np.float32) + 0.5) / max(L.horizon, 1.0), 0, 1) ** 0.8
    sky = rgb(k.sky_top) * (1 - t)[:, None, None] + rgb(k.sky_horizon) * t[:, None, None]  # (H, 1, 3)
    clouds = (np.clip(smooth_noise(rng, (H, W), (4, 6)) * 0.6 + (k.clouds - 0.5), 0, 1) * k.clouds)[..., None]
    is_sky = face == FACE_SKY
    img = np.where(is_sky[..., None], sky * (1 - clouds) + rgb(k.cloud_color) * clouds, img)

    # Shading: walls along the street vs walls facing the camera; objects darker near the
    # ground; the ground slightly darker close to the camera; mottled green and worn asphalt;
    # paving joints where they are resolved.
    depth = L.depth
    b = L.uv[..., 1]
    blotch = smooth_noise(rng, (H, W), (max(2, H // 6), max(2, W // 6)))
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
        img[bonnet] = rgb(k.bonnet) * (1.0 - 0.35 * down)[:, None] + 60.0 * reflection[:, None]

    # Aerial perspective: distant things fade into the haze colour.
    haze = ((1.0 - np.exp(-depth / k.haze_distance)) * ~is_sky)[..., None]
    img = img * (1 - haze) + rgb(k.haze) * haze

    # Grading: saturation, tint, contrast, brightness; then luminance grain.
    grey = img.mean(axis=2, keepdims=True)
    img = (grey + k.saturation * (img - grey)) * rgb(k.tint)
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
