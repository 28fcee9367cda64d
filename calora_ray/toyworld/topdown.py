"""The top-down view of the pretraining world: an orthographic camera looking straight down on a
street or a crossing (roads, lane marks, zebras, kerbs, buildings with roofs, trees, poles, cars,
persons, sun shadows), rasterised into the same ``Layout`` the first-person camera fills
(calora_ray.toyworld.city), so the world's painter colours both."""

from __future__ import annotations

import math

import numpy as np

from calora_ray.toyworld.city import (
    BUILDING,
    CAR,
    FACE_GROUND,
    FACE_TOP,
    PART_CENTRE_LINE,
    PART_GLASS,
    PART_HEAD_LIGHT,
    PART_KERB,
    PART_LAMP,
    PART_MARKING,
    PART_NONE,
    PART_ROOF_RIM,
    PART_ROOF_SHADE,
    PART_ROOF_UNIT,
    PART_TAIL_LIGHT,
    PERSON,
    POLE,
    ROAD,
    SIDEWALK,
    TERRAIN,
    VEGETATION,
    Draws,
    Layout,
    parse_size,
    pixel_span,
    put_surface,
)

TOPDOWN_ALTITUDE = 300.0          # metres; top-down depth = altitude - height of the surface


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
        r = pixel_span(min(rows) + self.h / 2 - pad, max(rows) + self.h / 2 + pad, self.h)
        if r is None:
            return None
        cc = pixel_span(min(cols) + self.w / 2 - pad, max(cols) + self.w / 2 + pad, self.w)
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
    put_surface(L, rows, cols, mask, TOPDOWN_ALTITUDE - height, label, FACE_TOP, part, inst, a, b)


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
    put_surface(L, rows, cols, mask, TOPDOWN_ALTITUDE - height, label, FACE_TOP, part, inst, dx / radius, dy / radius)


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
    height, width = parse_size(size)
    rnd = Draws(rng)
    u = rnd.uniform
    extent = u(34.0, 70.0)                                            # metres across the width
    theta = u(0.0, math.pi) if rnd.random() < 0.5 else rnd.integer(0, 4) * math.pi / 2 + u(-0.06, 0.06)
    ox, oy = u(-0.22, 0.22) * extent, u(-0.22, 0.22) * extent
    T = _TopView(height, width, extent / width, theta, ox, oy)
    mpp = T.mpp
    reach = 0.75 * extent * max(height, width) / width + 6.0         # half-size of what must be drawn
    L = Layout.empty(height, width, TERRAIN, FACE_GROUND, focal=1.0 / mpp, horizon=0.0)

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
    put_surface(L, slice(0, height), slice(0, width), np.ones(X.shape, bool), TOPDOWN_ALTITUDE, label, FACE_GROUND,
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

