"""The pretraining world's renderer: the same kind of street under every style, viewpoint and condition.

`render_world(seed, style, viewpoint, condition, size)` draws, from `seed` alone, a street
(a first-person layout from a randomly drawn Geometry (calora_ray.toyworld.city), or a top-down
layout (calora_ray.toyworld.topdown)), a random palette (WorldLook), and paints it
photorealistically or as a sketch, in clear, foggy, night, rainy or snowy weather. The layout
depends only on (seed, viewpoint), so the label is the same under every style and condition;
style and condition only change paint. `render_world_sample(seed)` renders world sample `seed`
with its attributes and caption (calora_ray.toyworld.world).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np

from calora_ray.data.labels import class_names_present, colorize
from calora_ray.toyworld.city import (
    BUILDING,
    CAR,
    FACE_FRONT,
    FACE_GROUND,
    FACE_SIDE,
    FACE_SKY,
    FACE_TOP,
    PART_HEAD_LIGHT,
    PART_LAMP,
    PART_LAMP_AMBER,
    PART_LAMP_GREEN,
    PART_LAMP_RED,
    PART_NONE,
    PART_ROOF_RIM,
    PART_ROOF_SHADE,
    PART_SHOP,
    PART_TAIL_LIGHT,
    PART_WINDOW,
    POLE,
    RGB,
    ROAD,
    SIDEWALK,
    TERRAIN,
    VEGETATION,
    Draws,
    Geometry,
    Layout,
    Look,
    albedo_image,
    rgb,
    sample_layout,
    smooth_noise,
)
from calora_ray.toyworld.topdown import sample_topdown_layout
from calora_ray.toyworld.world import (
    CAPTION_MIN_FRACTION,
    CONDITIONS,
    STYLES,
    VIEWPOINTS,
    caption,
    sample_attributes,
)

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

WORLD_HORIZON_MAX = 0.42          # target: 0.45 .. 0.49 of the height
WORLD_CAMERA_HEIGHT_MIN = 1.8     # metres; target: 1.3
WORLD_SATURATION_MIN = 1.0        # target: 0.75
_WORLD_STREAM = 2                 # seeds the world's generators apart from target (0) / source (1)


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


def sample_world_geometry(rnd: Draws) -> Geometry:
    """A first-person street of the pretraining world: suburb, town or city, random camera.

    Bounds exclude the target's camera (see the comment above WORLD_HORIZON_MAX).
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


def sample_world_look(rnd: Draws) -> WorldLook:
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
    """Refuse a world scene that carries the target's signature (see the comment above WORLD_HORIZON_MAX)."""
    if geometry is not None and (geometry.bonnet != 0 or geometry.horizon + geometry.horizon_jitter > WORLD_HORIZON_MAX
                                 or geometry.camera_height < WORLD_CAMERA_HEIGHT_MIN):
        raise RuntimeError(f"world geometry overlaps the target's camera: {geometry}")
    if look.saturation < WORLD_SATURATION_MIN or look.tint[1] >= max(look.tint[0], look.tint[2]):
        raise RuntimeError(f"world look overlaps the target's grading: saturation {look.saturation}, tint {look.tint}")


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
    img = albedo_image(L, rng, k)
    blotch = smooth_noise(rng, (H, W), (max(2, H // 6), max(2, W // 6)))
    grain = rng.standard_normal((H, W, 1)).astype(np.float32)
    cr = Draws(cond_rng)
    is_sky = face == FACE_SKY
    ground = face == FACE_GROUND
    b = L.uv[..., 1]
    extras: dict = {}

    # Snow lies on the ground, on roofs and cars, speckled on crowns; wheel tracks stay dark.
    if condition == "snowy":
        snow = rgb((236, 240, 248)) * cr.uniform(0.93, 1.0)
        cover = np.zeros((H, W), np.float32)
        speckle = smooth_noise(cond_rng, (H, W), (max(2, H // 3), max(2, W // 3)))
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
    img = img * shade[..., None] * rgb(light) * (cr.uniform(0.85, 1.15) if condition in ("rainy", "night") else 1.0)

    # The sky (first-person): clear blue with clouds, fog white, night dark blue with stars,
    # rain dark grey, snow pale grey.
    if not top:
        t = np.clip((np.arange(H, dtype=np.float32) + 0.5) / max(L.horizon, 1.0), 0, 1)[:, None, None] ** 0.8
        clouds = smooth_noise(cond_rng, (H, W), (4, 6))[..., None]
        if condition == "clear":
            sky = rgb(k.sky_top) * (1 - t) + rgb(k.sky_horizon) * t
            c = np.clip(clouds * 0.6 + (k.clouds - 0.5), 0, 1) * k.clouds
            sky = sky * (1 - c) + rgb(k.cloud_color) * c
        elif condition == "night":
            sky = rgb((4, 6, 16)) * (1 - t) + rgb((18, 24, 48)) * cr.uniform(0.8, 1.3) * t
            stars = (cond_rng.random((H, W)) < 0.01)[..., None]
            sky = sky + stars * cond_rng.uniform(40, 120)
        else:
            top_v, hor_v = {"foggy": (205, 215), "rainy": (88, 122), "snowy": (178, 208)}[condition]
            g = cr.uniform(0.9, 1.08)
            sky = (top_v * (1 - t) + hor_v * t) * g * rgb((0.97, 0.99, 1.03)) + 18.0 * clouds
        img = np.where(is_sky[..., None], sky, img)

    # Night: lit windows and shop fronts, lamps, head and tail lights, with a glow around them;
    # from above, pools of lamp light and head-light beams on the road.
    if condition == "night":
        emit = np.zeros((H, W, 3), np.float32)
        inst = L.instance
        if not top:
            window = part == PART_WINDOW
            lit = _hash01(inst, np.floor(L.uv[..., 0] / 2.7), np.floor(L.uv[..., 1] / 3.1)) < cr.uniform(0.3, 0.6)
            emit[window & lit] = rgb((255, 205, 130)) * cr.uniform(0.75, 1.0)
            emit[(part == PART_SHOP) & (_hash01(inst) < 0.7)] = rgb((250, 225, 170))
            pole = label == POLE
            lamp = pole & ~np.vstack([np.zeros((1, W), bool), pole[:-1]])
        else:
            lamp = part == PART_LAMP
        emit[lamp] = rgb((255, 225, 160))
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
        img += albedo * shade[..., None] * light_in[..., None] * rgb((1.0, 0.88, 0.65))

    # Rain: a wet road and pavement that mirror what stands above them, puddles from above.
    if condition == "rainy":
        wet = ground & ((label == ROAD) | (label == SIDEWALK))
        if top:
            puddle = (smooth_noise(cond_rng, (H, W), (max(2, H // 4), max(2, W // 4))) > 0.9) & wet
            img[wet] *= 0.75
            img[puddle] = img[puddle] * 0.5 + rgb((120, 128, 140)) * 0.5
        else:
            rows = np.arange(H)
            mirror = np.clip(np.round(2 * L.horizon - rows - 1).astype(np.int64), 0, H - 1)
            fresnel = (0.2 + 0.45 * np.exp(-np.maximum(rows - L.horizon, 0) / (0.25 * H)))[:, None, None]
            refl = img[mirror]
            img = np.where(wet[..., None], img * (1 - fresnel) * 0.85 + refl * fresnel, img)

    # Air: haze by distance when clear; fog (from above: an even veil); rain and snow a grey veil.
    if top:
        amount = {"clear": 0.0, "foggy": cr.uniform(0.6, 0.75), "rainy": 0.15, "snowy": 0.2, "night": 0.0}[condition]
        veil = np.full((H, W), amount, np.float32) * (1.0 + 0.12 * smooth_noise(cond_rng, (H, W), (3, 3)))
    else:
        dist = {"clear": k.haze_distance, "foggy": cr.uniform(7.0, 16.0), "rainy": cr.uniform(60.0, 120.0),
                "snowy": cr.uniform(60.0, 130.0), "night": 150.0}[condition]
        veil = (1.0 - np.exp(-depth / dist)).astype(np.float32)
        if condition == "foggy":
            veil = 0.3 + 0.7 * veil
        veil[is_sky] = 0.0 if condition in ("clear", "night") else 1.0
    veil = np.clip(veil, 0, 1)
    air = {"clear": rgb(k.haze), "foggy": rgb((212, 216, 220)) * cr.uniform(0.9, 1.05),
           "rainy": rgb((118, 124, 132)), "snowy": rgb((212, 218, 228)), "night": rgb((10, 12, 22))}[condition]
    img = img * (1 - veil[..., None]) + air * veil[..., None]

    # Grading (the look's, never the target's), then grain; then rain streaks / snow flakes.
    sat = k.saturation * {"clear": 1.0, "foggy": 0.6, "rainy": 0.45, "snowy": 0.75, "night": 0.85}[condition]
    grey = img.mean(axis=2, keepdims=True)
    img = (grey + sat * (img - grey)) * rgb(k.tint)
    img = ((img - 128.0) * k.contrast + 128.0) * k.brightness
    img += k.noise * grain
    extras["veil"] = veil
    if condition == "rainy":
        slope = cr.uniform(-0.4, 0.4)
        streaks = _lines((H, W), cond_rng, int(70 * W / 64), 0.12 * H, slope)
        extras["under_streaks"] = img[streaks]
        img[streaks] = img[streaks] * 0.55 + rgb((200, 205, 215)) * 0.45
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
    v = np.clip(photo @ rgb((0.299, 0.587, 0.114)) / 255.0, 0, 1) ** 0.6
    d = 1.0 - v                                                          # darkness to draw
    rows = np.arange(H, dtype=np.float32)[:, None]
    cols = np.arange(W, dtype=np.float32)[None, :]
    period = max(4.0, W / 32.0)
    wobble = 0.6 * period * smooth_noise(rng, (H, W), (3, 3))          # hand-drawn, not ruled
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
    paper = rgb(wlook.paper) * (1.0 + 0.03 * rng.standard_normal((H, W, 1)).astype(np.float32))
    out = paper * paper_left + rgb(wlook.ink) * (1.0 - paper_left)
    grey = photo.mean(axis=2, keepdims=True)
    return out + 0.12 * paper_left * (photo - grey)                      # a faint wash of colour


def _world_rng(seed: int, stream: int) -> np.random.Generator:
    if int(seed) < 0:
        raise ValueError(f"toy world seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([int(seed), _WORLD_STREAM, stream])


def _check_world_args(style: str, viewpoint: str, condition: str) -> None:
    for name, value, valid in (("style", style, STYLES), ("viewpoint", viewpoint, VIEWPOINTS),
                               ("condition", condition, CONDITIONS)):
        if value not in valid:
            raise ValueError(f"unknown toy world {name} {value!r}; valid: {', '.join(valid)}")


def world_layout(seed: int, viewpoint: str, size: int | tuple[int, int] = 64) -> tuple[Layout, WorldLook]:
    """The scene of `seed` seen from `viewpoint` (its Layout), and its palette."""
    _check_world_args("photorealistic", viewpoint, "clear")
    rnd = Draws(_world_rng(seed, 0))
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

    seed: non-negative int (the street, its palette, its weather details); style in STYLES,
    viewpoint in VIEWPOINTS, condition in CONDITIONS; size: int or (height, width).
    Returns (image HxWx3 uint8, label HxW uint8 train ids). The label depends on (seed,
    viewpoint, size) only: the same under every style and condition. No world scene has the
    target's bonnet, camera or grading.
    """
    _check_world_args(style, viewpoint, condition)
    layout, wlook = world_layout(seed, viewpoint, size)
    photo, extras = paint_world(layout, _world_rng(seed, 3), wlook, condition,
                                _world_rng(seed, 10 + CONDITIONS.index(condition)))
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


def render_world_sample(seed: int, size: int | tuple[int, int] = 64) -> dict:
    """World sample `seed`: dict(image HxWx3 uint8, label HxW uint8 train ids, caption, style,
    viewpoint, condition). The caption names the classes present in the label (train-id order)
    when the sample's with_classes is set, and its condition unless it is clear weather left unsaid.
    """
    a = sample_attributes(seed)
    image, label = render_world(seed, a["style"], a["viewpoint"], a["condition"], size)
    names = class_names_present(label, CAPTION_MIN_FRACTION) if a["with_classes"] else None
    text = caption(a["style"], a["viewpoint"], a["condition"] if a["with_condition"] else None, names)
    return {"image": image, "label": label, "caption": text, "style": a["style"], "viewpoint": a["viewpoint"],
            "condition": a["condition"]}
