"""Procedural face-like identities: a face-recognition data set that needs no download.

    python -m sparse_embed.data.synthetic --output=data/synth --identities=1000 --images_per_identity=20 \\
        --test_identities=100 --workers=2

An identity is a fixed set of geometry and texture parameters (face shape and
size, skin tone, ears, eye spacing/size/colour, brows, nose, mouth, hair colour
and style, facial hair, glasses, moles, freckles, blush). Every image of it is
re-rendered under random nuisances: in-plane rotation, a yaw-like turn that
moves features by their depth, scale and shift, eye openness and gaze,
expression, background clutter and clothes, lighting (brightness, contrast,
white balance, a directional gradient), blur, sensor noise and, sometimes, an
occluder (bar, patch, face mask, sunglasses). The nuisances are strong enough
that raw pixels are a poor identity signal, weak enough that a person (or a
small CNN) tells identities apart.

Everything is a pure function of (seed, identity index, image index), so the
output is byte-identical for a seed whatever the number of workers. Layout::

    out/train/id_00000/0.jpg ...   training identities 0 .. N-1
    out/test/id_0000N/0.jpg ...    K held-out identities N .. N+K-1
    out/pairs.txt                  LFW-format verification pairs over out/test
    out/synthetic.json             the generation parameters
    out/landmarks.csv              with --write_landmarks: image,x1,y1,...,x5,y5 per image
                                   (`face_landmarks`: eyes, nose tip, mouth corners, in pixels)
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from sparse_embed.cli import deprecated_alias, make_parser, program, user_errors_exit
from sparse_embed.data import format_summary
from sparse_embed.data.verification import DifferentPair, SamePair, write_pairs
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry

# Bumped whenever the renderer changes, so a stale data set is recognisable.
GENERATOR_VERSION = 1

# Shapes are drawn at this multiple of the output size and box-filtered down:
# PIL's polygon fill is not antialiased.
SUPERSAMPLE = 3
JPEG_QUALITY = 90

# The five-point sidecar of `generate(landmarks=True)`: image path relative to the
# output, then x1, y1, ..., x5, y5 in pixels (`face_landmarks`).
LANDMARKS_FILE = "landmarks.csv"
LANDMARKS_HEADER = ("image", *(f"{axis}{i}" for i in range(1, 6) for axis in "xy"))

# Independent random streams: one per identity, one per image, one for the pairs.
_IDENTITY_STREAM, _IMAGE_STREAM, _PAIRS_STREAM = 1, 2, 3

Color = tuple[float, float, float]

_SKIN_TONES = np.array(
    [
        (255, 226, 200),
        (241, 194, 160),
        (224, 172, 125),
        (198, 134, 90),
        (160, 102, 66),
        (118, 74, 48),
        (84, 54, 38),
    ],
    dtype=np.float64,
)
_HAIR_COLORS = np.array(
    [
        (22, 18, 18),
        (48, 33, 25),
        (86, 58, 38),
        (122, 82, 48),
        (150, 78, 42),
        (182, 98, 50),
        (205, 170, 105),
        (232, 210, 150),
        (140, 136, 132),
        (215, 212, 205),
    ],
    dtype=np.float64,
)
# Dyed hair is rare but makes a few identities stand out, as in real data.
_DYED_COLORS = np.array(
    [(40, 70, 150), (150, 50, 120), (60, 120, 80), (190, 60, 60)], dtype=np.float64
)
_IRIS_COLORS = np.array(
    [
        (40, 26, 18),
        (84, 52, 30),
        (120, 96, 50),
        (74, 112, 66),
        (64, 110, 170),
        (112, 124, 136),
    ],
    dtype=np.float64,
)
# Short (above the ears), medium, long: hair_length ranges in face units below the face centre.
_HAIR_LENGTHS = ((-0.4, 0.0), (0.0, 0.5), (0.5, 1.4))
_FRAME_COLORS = np.array(
    [(20, 20, 20), (90, 55, 30), (190, 160, 80), (170, 170, 175), (150, 30, 40)], dtype=np.float64
)


@dataclass(frozen=True)
class FaceIdentity:
    """The stable parameters of one identity, in face coordinates.

    Face coordinates put the image in [-1, 1] x [-1, 1] (x right, y down) for an
    upright, frontal, unit-scale pose; the defaults place eyes and mouth where a
    112x112 ArcFace-aligned crop has them. Colours are RGB in [0, 255].
    """

    face_w: float
    face_h: float
    face_top: float
    face_y: float
    jaw_taper: float
    squareness: float
    skin: Color
    ear_w: float
    ear_h: float
    ear_y: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris_r: float
    iris: Color
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_slope: float
    brow_len: float
    brow: Color
    nose_top: float
    nose_y: float
    nose_w: float
    nose_bridge: float
    mouth_y: float
    mouth_w: float
    lip_upper: float
    lip_lower: float
    smile: float
    lips: Color
    hair: Color
    bald: bool
    hair_volume: float
    hair_length: float
    hairline_y: float
    hairline_curve: float
    hair_part: float
    fringe_teeth: int
    fringe_jag: float
    temple: float
    beard: float
    moustache: bool
    glasses: bool
    glasses_round: bool
    frame: Color
    moles: tuple[tuple[float, float, float], ...]
    freckles: tuple[tuple[float, float], ...]
    blush: float


@dataclass(frozen=True)
class Nuisance:
    """The per-image variation of one rendering.

    Lengths are in face coordinates, angles in radians, `blur` and `noise` in
    pixels / grey levels at 112x112.
    """

    roll: float
    yaw: float
    scale: float
    shift: tuple[float, float]
    openness: float
    gaze: float
    smile: float
    mouth_open: float
    background: Color
    clutter: tuple[tuple[float, ...], ...]
    clothes: Color
    light_angle: float
    light_strength: float
    brightness: float
    contrast: float
    white_balance: Color
    blur: float
    noise: float
    noise_seed: int
    occluder: str | None
    occluder_u: tuple[float, ...]
    occluder_color: Color


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> Color:
    color = palette[rng.integers(len(palette))] + rng.normal(0.0, jitter, 3)
    return tuple(float(c) for c in np.clip(color, 0, 255))


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> Color:
    return tuple(float((1 - t) * x + t * y) for x, y in zip(a, b, strict=True))


def _shade(color: Sequence[float], factor: float) -> Color:
    return tuple(float(min(255.0, c * factor)) for c in color)


def sample_identity(seed: int, identity_index: int) -> FaceIdentity:
    """Draws the parameters of one identity.

    Args:
        seed: Data-set seed.
        identity_index: Global identity index (training identities first, then held-out).

    Returns:
        The identity; a pure function of its arguments.
    """
    r = _rng(seed, _IDENTITY_STREAM, identity_index)
    u = r.uniform
    tone = u(0, len(_SKIN_TONES) - 1)
    lo = int(tone)
    skin = _mix(_SKIN_TONES[lo], _SKIN_TONES[min(lo + 1, len(_SKIN_TONES) - 1)], tone - lo)
    skin = tuple(float(np.clip(c + r.normal(0, 7), 0, 255)) for c in skin)

    hair = _pick(r, _DYED_COLORS if r.random() < 0.05 else _HAIR_COLORS, 10.0)
    bald = bool(r.random() < 0.08)
    brow_color = _shade(hair, u(0.55, 0.9)) if sum(hair) < 450 else _shade(hair, u(0.45, 0.7))
    face_w = u(0.58, 0.78)
    eye_w = u(0.085, 0.135)
    eye_dx = u(0.27, 0.38)
    mouth_w = u(0.16, 0.29)
    lips = _mix(skin, (190, 70, 80), u(0.2, 0.55))

    def spots(count: int, radius: tuple[float, float]) -> list[tuple[float, float, float]]:
        # Anywhere on the cheeks, forehead or chin; features drawn later may cover some.
        x = u(-0.75, 0.75, count) * face_w
        y = u(-0.55, 0.8, count)
        return [
            (float(a), float(b), float(c)) for a, b, c in zip(x, y, u(*radius, count), strict=True)
        ]

    n_moles = int(r.choice(4, p=[0.45, 0.3, 0.15, 0.1]))
    freckles = []
    if r.random() < 0.2:
        n = int(r.integers(12, 35))
        freckles = [
            (float(x), float(y))
            for x, y in zip(r.normal(0, 0.25, n), r.normal(0.12, 0.1, n), strict=True)
        ]
    return FaceIdentity(
        face_w=face_w,
        face_h=u(0.78, 0.95),
        face_top=u(0.75, 0.95),
        face_y=u(0.02, 0.12),
        jaw_taper=u(0.0, 0.4),
        squareness=u(2.0, 3.2),
        skin=skin,
        ear_w=u(0.07, 0.13),
        ear_h=u(0.14, 0.24),
        ear_y=u(-0.12, 0.08),
        eye_dx=eye_dx,
        eye_y=u(-0.18, -0.02),
        eye_w=eye_w,
        eye_h=eye_w * u(0.38, 0.62),
        eye_tilt=u(-0.2, 0.25),
        iris_r=u(0.75, 1.0),
        iris=_pick(r, _IRIS_COLORS, 8.0),
        brow_gap=u(0.04, 0.11),
        brow_thick=u(0.025, 0.07),
        brow_arch=u(-0.01, 0.07),
        brow_slope=u(-0.05, 0.06),
        brow_len=u(0.9, 1.4),
        brow=brow_color,
        nose_top=u(-0.1, 0.0),
        nose_y=u(0.22, 0.4),
        nose_w=u(0.07, 0.14),
        nose_bridge=u(0.02, 0.05),
        mouth_y=u(0.52, 0.68),
        mouth_w=mouth_w,
        lip_upper=u(0.018, 0.05),
        lip_lower=u(0.025, 0.065),
        smile=u(-0.03, 0.05),
        lips=lips,
        hair=hair,
        bald=bald,
        hair_volume=u(0.03, 0.22),
        hair_length=u(*_HAIR_LENGTHS[r.integers(len(_HAIR_LENGTHS))]),
        hairline_y=u(-0.78, -0.42),
        hairline_curve=u(-0.1, 0.25),
        hair_part=u(-0.2, 0.2),
        fringe_teeth=int(r.integers(0, 9)),
        fringe_jag=u(0.0, 0.12) if r.random() < 0.4 else 0.0,
        temple=u(0.05, 0.45),
        beard=u(0.3, 1.0) if r.random() < 0.22 else 0.0,
        moustache=bool(r.random() < 0.2),
        glasses=bool(r.random() < 0.15),
        glasses_round=bool(r.random() < 0.5),
        frame=_pick(r, _FRAME_COLORS, 10.0),
        moles=tuple(spots(n_moles, (0.012, 0.03))),
        freckles=tuple(freckles),
        blush=u(0.1, 0.35) if r.random() < 0.35 else 0.0,
    )


# Occluders: name -> fn(painter, identity, six uniforms in [0, 1), colour). Each
# maps the uniforms to its own position and size ranges.
OCCLUDERS: Registry[Callable[[_Painter, FaceIdentity, Sequence[float], Color], None]] = Registry(
    "occluder"
)


def sample_nuisance(seed: int, identity_index: int, image_index: int) -> Nuisance:
    """Draws the per-image variation of one image.

    Args:
        seed: Data-set seed.
        identity_index: Global identity index.
        image_index: Index of the image within its identity.

    Returns:
        The nuisance parameters; a pure function of the arguments.
    """
    r = _rng(seed, _IMAGE_STREAM, identity_index, image_index)
    u = r.uniform
    clutter = tuple(
        (float(r.integers(2)), *u(-1.2, 1.2, 2), *u(0.15, 0.8, 2), *u(20, 235, 3))
        for _ in range(int(r.integers(1, 5)))
    )
    names = OCCLUDERS.names()
    occluder = names[int(r.integers(len(names)))] if r.random() < 0.2 else None
    return Nuisance(
        roll=float(np.clip(r.normal(0, 0.14), -0.35, 0.35)),
        yaw=u(-0.3, 0.3),
        scale=u(0.86, 1.12),
        shift=(
            float(np.clip(r.normal(0, 0.05), -0.12, 0.12)),
            float(np.clip(r.normal(0, 0.05), -0.12, 0.12)),
        ),
        openness=float(np.clip(r.normal(1.0, 0.18), 0.15, 1.25)),
        gaze=u(-0.3, 0.3),
        smile=r.normal(0, 0.018),
        mouth_open=u(0.0, 0.05) if r.random() < 0.3 else 0.0,
        background=tuple(float(c) for c in u(15, 240, 3)),
        clutter=clutter,
        clothes=tuple(float(c) for c in u(10, 245, 3)),
        light_angle=u(0, 2 * math.pi),
        light_strength=u(0.0, 0.4),
        brightness=u(0.7, 1.25),
        contrast=u(0.7, 1.3),
        white_balance=tuple(float(c) for c in np.clip(r.normal(1.0, 0.07, 3), 0.8, 1.2)),
        blur=u(0.2, 1.4) if r.random() < 0.6 else 0.0,
        noise=u(0.0, 9.0),
        noise_seed=int(r.integers(2**31)),
        occluder=occluder,
        occluder_u=tuple(float(x) for x in u(0, 1, 6)),
        occluder_color=tuple(float(c) for c in u(10, 245, 3)),
    )


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 36
) -> np.ndarray:
    cos_t, sin_t = _unit_circle(n)
    x, y = rx * cos_t, ry * sin_t
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


@functools.cache
def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


class _Painter:
    """Draws face-coordinate polygons onto a supersampled canvas under a head pose.

    A point (x, y) at depth z (towards the camera, in face-width units) lands at
    x' = x cos(yaw) + z sin(yaw): a crude turn of the head that moves the nose
    more than the eyes and the eyes more than the outline.
    """

    def __init__(self, image_size: int, nuisance: Nuisance) -> None:
        self.n = image_size * SUPERSAMPLE
        self.image = Image.new("RGB", (self.n, self.n), _rgb(nuisance.background))
        self.draw = ImageDraw.Draw(self.image)
        c, s = math.cos(nuisance.roll), math.sin(nuisance.roll)
        self._matrix = nuisance.scale * np.array([[c, -s], [s, c]])
        self._shift = np.asarray(nuisance.shift)
        self._cos_yaw, self._sin_yaw = math.cos(nuisance.yaw), math.sin(nuisance.yaw)
        self.pixels_per_unit = self.n / 2 * nuisance.scale

    def project(self, points: np.ndarray, depth: float | np.ndarray = 0.0) -> list[float]:
        """Maps face-coordinate points [k, 2] to a flat pixel list [x0, y0, x1, ...]."""
        return _project(points, depth, self._matrix, self._shift, self._cos_yaw, self._sin_yaw,
                        self.n).ravel().tolist()

    def polygon(
        self, points: np.ndarray, color: Sequence[float], depth: float | np.ndarray = 0.0
    ) -> None:
        """Fills a face-coordinate polygon."""
        self.draw.polygon(self.project(points, depth), fill=_rgb(color))

    def line(
        self,
        points: np.ndarray,
        color: Sequence[float],
        width: float,
        depth: float | np.ndarray = 0.0,
    ) -> None:
        """Strokes a face-coordinate polyline `width` face units wide."""
        pixels = max(1, round(width * self.pixels_per_unit))
        self.draw.line(self.project(points, depth), fill=_rgb(color), width=pixels, joint="curve")

    def image_polygon(self, points: np.ndarray, color: Sequence[float]) -> None:
        """Fills a polygon given in image coordinates ([-1, 1]^2, independent of the pose)."""
        self.draw.polygon(((points + 1.0) * (self.n / 2)).ravel().tolist(), fill=_rgb(color))


def _project(points: np.ndarray, depth: float | np.ndarray, matrix: np.ndarray, shift: np.ndarray,
             cos_yaw: float, sin_yaw: float, n: int) -> np.ndarray:
    """The pose's projection of face-coordinate points [k, 2] to pixels [k, 2] of an n x n canvas."""
    x = points[:, 0] * cos_yaw + np.asarray(depth) * sin_yaw
    xy = np.stack([x, points[:, 1]], axis=1) @ matrix.T + shift
    return (xy + 1.0) * (n / 2)


# Where the renderer draws the five landmark features, as (face-coordinate point, depth)
# of each: eye centres (the sclera's centre, depth 0.5), the nose's lowest point (1.0)
# and the mouth line's two ends (0.6). Keep in step with _draw_eyes, _draw_nose, _draw_mouth.
def face_landmarks(identity: FaceIdentity, nuisance: Nuisance, image_size: int = 112) -> np.ndarray:
    """The five points `render_face` draws: eye centres, nose tip, mouth corners.

    The points go through the same pose as the drawing (roll, yaw by depth,
    scale, shift), so they sit on the rendered features whatever the nuisance;
    occluders may hide them, as a hand hides a real face's.

    Args:
        identity: The identity's stable parameters.
        nuisance: The image's variation.
        image_size: Side of the square image in pixels.

    Returns:
        float64 [5, 2] (x, y) in pixels of the `image_size` image (0 is the
        left / top edge of the first pixel), in the order image-left eye,
        image-right eye, nose tip, image-left and image-right mouth corner.
    """
    f, v = identity, nuisance
    corner_y = f.mouth_y - (f.smile + v.smile) * 0.5
    points = np.array([
        [-f.eye_dx, f.eye_y], [f.eye_dx, f.eye_y], [0.0, f.nose_y + 0.04],
        [-f.mouth_w, corner_y], [f.mouth_w, corner_y],
    ])
    depth = np.array([0.5, 0.5, 1.0, 0.6, 0.6])
    c, s = math.cos(v.roll), math.sin(v.roll)
    matrix = v.scale * np.array([[c, -s], [s, c]])
    return _project(points, depth, matrix, np.asarray(v.shift), math.cos(v.yaw), math.sin(v.yaw),
                    image_size)


def image_landmarks(seed: int, identity_index: int, image_index: int,
                    image_size: int = 112) -> np.ndarray:
    """`face_landmarks` of the image `render_image` renders for the same arguments.

    Args:
        seed: Data-set seed.
        identity_index: Global identity index.
        image_index: Image index within the identity.
        image_size: Side of the square image in pixels.

    Returns:
        float64 [5, 2] (x, y) pixels, as `face_landmarks`.
    """
    return face_landmarks(sample_identity(seed, identity_index),
                          sample_nuisance(seed, identity_index, image_index), image_size)


def _rgb(color: Sequence[float]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, round(c))) for c in color)


def _outline_at(f: FaceIdentity, angles: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """Points of the face oval at `angles` (0 = right, pi/2 = chin), grown outwards by `grow`.

    A superellipse whose lower half narrows towards the jaw and whose upper half
    (the forehead) has its own height.
    """
    c, s = np.cos(angles), np.sin(angles)
    e = 2.0 / f.squareness
    cx, sy = np.sign(c) * np.abs(c) ** e, np.sign(s) * np.abs(s) ** e
    x = (f.face_w + grow) * cx * (1 - f.jaw_taper * np.maximum(s, 0) ** 2)
    y = np.where(s > 0, f.face_h + grow, f.face_top + grow) * sy + f.face_y
    return np.stack([x, y], axis=-1)


def _face_outline(f: FaceIdentity, grow: float = 0.0, n: int = 64) -> np.ndarray:
    return _outline_at(f, np.linspace(0, 2 * np.pi, n, endpoint=False), grow)


def _draw_background(p: _Painter, v: Nuisance) -> None:
    for is_ellipse, cx, cy, w, h, *color in v.clutter:
        if is_ellipse:
            p.image_polygon(_ellipse(cx, cy, w, h, n=24), color)
        else:
            p.image_polygon(
                np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]]),
                color,
            )


def _draw_body(p: _Painter, f: FaceIdentity, v: Nuisance) -> None:
    neck_w = f.face_w * 0.55
    top = f.face_y + 0.3
    p.polygon(
        np.array([[-neck_w, top], [neck_w, top], [neck_w, 1.6], [-neck_w, 1.6]]),
        _shade(f.skin, 0.82),
    )
    shoulders = np.array(
        [[-2.2, 1.8], [-1.9, 1.25], [-0.8, 1.02], [0.0, 1.12], [0.8, 1.02], [1.9, 1.25], [2.2, 1.8]]
    )
    p.polygon(shoulders, v.clothes)


def _hair_back(f: FaceIdentity) -> np.ndarray:
    """Hair behind the head: the grown outline's upper half, extended down the sides."""
    grown = _face_outline(f, grow=f.hair_volume, n=48)
    upper = grown[grown[:, 1] <= f.face_y + 1e-9]
    upper = upper[np.argsort(np.arctan2(upper[:, 1] - f.face_y, upper[:, 0]))]
    width = f.face_w + f.hair_volume
    bottom = f.face_y + max(f.hair_length, 0.0)
    sides = np.array(
        [
            [width * 1.02, bottom],
            [width * 0.75, bottom + 0.08],
            [-width * 0.75, bottom + 0.08],
            [-width * 1.02, bottom],
        ]
    )
    return np.concatenate([upper, sides])


def _hair_front(f: FaceIdentity) -> np.ndarray:
    """Hair over the forehead: from the hairline up to the grown outline."""
    left_angle, right_angle = math.pi + f.temple, 2 * math.pi - f.temple
    arc = _outline_at(f, np.linspace(left_angle, right_angle, 24), grow=f.hair_volume * 0.6)
    left, right = _outline_at(f, np.array([left_angle, right_angle]))
    x = np.linspace(right[0], left[0], 32)
    rel = x / f.face_w
    y = f.hairline_y + f.face_y + f.hairline_curve * rel**2 + f.hair_part * rel * 0.3
    if f.fringe_teeth:
        y = y + f.fringe_jag * np.abs(np.sin(rel * math.pi * f.fringe_teeth / 2))
    # Meet the outline at the temples instead of overshooting it.
    w = np.clip(np.abs(rel) / max(abs(right[0] / f.face_w), 1e-3), 0, 1) ** 4
    y = (1 - w) * y + w * np.interp(x, [left[0], right[0]], [left[1], right[1]])
    return np.concatenate([arc, np.stack([x, y], axis=1)])


def _draw_head(p: _Painter, f: FaceIdentity) -> None:
    if not f.bald:
        p.polygon(_hair_back(f), _shade(f.hair, 0.85))
    if f.bald or f.hair_length < 0.25:
        for side in (-1, 1):
            ear = _ellipse(side * (f.face_w * 0.97), f.face_y + f.ear_y, f.ear_w, f.ear_h)
            # Behind the face plane: on a turn the far ear hides behind the cheek.
            p.polygon(ear, _shade(f.skin, 0.88), -0.35)
    outline = _face_outline(f)
    p.polygon(outline, f.skin)
    if f.blush:
        for side in (-1, 1):
            cheek = _ellipse(side * f.eye_dx * 1.05, (f.eye_y + f.mouth_y) / 2 + 0.05, 0.13, 0.08)
            p.polygon(cheek, _mix(f.skin, (225, 110, 110), f.blush), 0.5)
    for x, y, radius in f.moles:
        if _inside(outline, x, y):
            p.polygon(_ellipse(x, y, radius, radius, n=12), _shade(f.skin, 0.45), 0.45)
    for x, y in f.freckles:
        if _inside(outline, x, y):
            p.polygon(_ellipse(x, y, 0.009, 0.009, n=8), _shade(f.skin, 0.75), 0.5)
    if not f.bald:
        p.polygon(_hair_front(f), f.hair, 0.2)


def _inside(polygon: np.ndarray, x: float, y: float) -> bool:
    """Whether (x, y) is inside a simple polygon (even-odd rule)."""
    px, py = polygon[:, 0], polygon[:, 1]
    qx, qy = np.roll(px, 1), np.roll(py, 1)
    crosses = (py > y) != (qy > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = (qx - px) * (y - py) / (qy - py) + px
    return bool(np.count_nonzero(crosses & (x < at)) % 2)


def _draw_beard(p: _Painter, f: FaceIdentity) -> None:
    if f.beard:
        outline = _face_outline(f, grow=0.02, n=64)
        top = f.nose_y + 0.05
        lower = outline[outline[:, 1] > top]
        lower = lower[np.argsort(-lower[:, 0])]
        x = np.linspace(lower[-1, 0], lower[0, 0], 16)
        rel = x / f.face_w
        y = top + 0.12 * (1 - rel**2) - 0.05
        color = _mix(f.skin, _shade(f.hair, 0.9), f.beard)
        p.polygon(np.concatenate([lower, np.stack([x, y], axis=1)]), color, 0.4)
    if f.moustache:
        w = f.mouth_w * 1.1
        x = np.linspace(-w, w, 12)
        top = f.mouth_y - f.lip_upper - 0.07 + 0.02 * (x / w) ** 2
        bottom = f.mouth_y - f.lip_upper - 0.005 + 0.03 * (x / w) ** 2
        points = np.concatenate([np.stack([x, top], 1), np.stack([x[::-1], bottom[::-1]], 1)])
        p.polygon(points, _shade(f.hair, 0.9), 0.6)


def _place(local: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Rotates local points [k, 2] by `angle` and moves them to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.stack(
        [cx + c * local[:, 0] - s * local[:, 1], cy + s * local[:, 0] + c * local[:, 1]], axis=1
    )


def _draw_eyes(p: _Painter, f: FaceIdentity, v: Nuisance) -> None:
    eye_h = f.eye_h * v.openness
    for side in (-1, 1):
        cx, cy = side * f.eye_dx, f.eye_y
        place = functools.partial(_place, cx=cx, cy=cy, angle=-side * f.eye_tilt)
        p.polygon(
            place(_ellipse(0, 0, f.eye_w * 1.15, eye_h * 1.4 + 0.02)), _shade(f.skin, 0.9), 0.5
        )
        sclera = _ellipse(0, 0, f.eye_w, eye_h)
        p.polygon(place(sclera), (236, 232, 226), 0.5)
        # Clip the iris and pupil to the eye opening, so half-closed eyes look right.
        radius = f.iris_r * f.eye_h * 0.95
        gx = v.gaze * f.eye_w * 0.5
        for r, color in ((radius, f.iris), (radius * 0.45, (12, 10, 10))):
            disc = _ellipse(gx, 0, r, r, n=24)
            limit = eye_h * np.sqrt(np.clip(1 - (disc[:, 0] / f.eye_w) ** 2, 0, 1))
            disc[:, 1] = np.clip(disc[:, 1], -limit, limit)
            p.polygon(place(disc), color, 0.55)
        lid = sclera[sclera[:, 1] <= 0]
        lid = lid[np.argsort(lid[:, 0])]
        p.line(place(lid), (30, 22, 20), 0.016, 0.55)
        t = np.linspace(0, 1, 10)
        inner = f.eye_dx - f.eye_w * 0.9
        outer = f.eye_dx + f.eye_w * f.brow_len
        x = side * (inner + (outer - inner) * t)
        y = f.eye_y - f.eye_h - f.brow_gap - f.brow_arch * np.sin(np.pi * t) + f.brow_slope * t
        half = f.brow_thick * (1 - 0.55 * t) / 2
        brow = np.concatenate(
            [np.stack([x, y - half], 1), np.stack([x[::-1], (y + half)[::-1]], 1)]
        )
        p.polygon(brow, f.brow, 0.55)


def _draw_nose(p: _Painter, f: FaceIdentity) -> None:
    top = f.eye_y + f.nose_top + 0.05
    shape = np.array(
        [
            [-f.nose_bridge, top],
            [f.nose_bridge, top],
            [f.nose_w, f.nose_y - 0.01],
            [0.0, f.nose_y + 0.04],
            [-f.nose_w, f.nose_y - 0.01],
        ]
    )
    depth = np.array([0.6, 0.6, 0.85, 1.0, 0.85])
    p.polygon(shape, _shade(f.skin, 0.9), depth)
    p.polygon(_ellipse(0, f.nose_y - 0.02, f.nose_w * 0.55, 0.035), _shade(f.skin, 1.05), 1.0)
    for side in (-1, 1):
        nostril = _ellipse(side * f.nose_w * 0.5, f.nose_y + 0.015, f.nose_w * 0.3, f.nose_w * 0.14)
        p.polygon(nostril, _shade(f.skin, 0.45), 0.9)


def _draw_mouth(p: _Painter, f: FaceIdentity, v: Nuisance) -> None:
    w = f.mouth_w
    x = np.linspace(-w, w, 21)
    rel = x / w
    line = f.mouth_y - (f.smile + v.smile) * (rel**2 - 0.5)
    gap = v.mouth_open * (1 - rel**2)
    bow = 1 - 0.35 * np.exp(-((rel / 0.25) ** 2))
    upper = line - gap / 2 - f.lip_upper * (1 - rel**2) ** 0.6 * bow
    lower = line + gap / 2 + f.lip_lower * (1 - rel**2) ** 0.6
    if v.mouth_open:
        inside = np.concatenate(
            [np.stack([x, line - gap / 2], 1), np.stack([x[::-1], (line + gap / 2)[::-1]], 1)]
        )
        p.polygon(inside, (45, 20, 25), 0.55)
    p.polygon(
        np.concatenate([np.stack([x, upper], 1), np.stack([x[::-1], (line - gap / 2)[::-1]], 1)]),
        _shade(f.lips, 0.9),
        0.6,
    )
    p.polygon(
        np.concatenate([np.stack([x, line + gap / 2], 1), np.stack([x[::-1], lower[::-1]], 1)]),
        f.lips,
        0.6,
    )
    p.line(np.stack([x, line], 1), _shade(f.lips, 0.55), 0.01, 0.6)


def _draw_glasses(p: _Painter, f: FaceIdentity) -> None:
    rx, ry = f.eye_w * 1.55, f.eye_h * 1.5 + 0.05
    for side in (-1, 1):
        if f.glasses_round:
            rim = _ellipse(side * f.eye_dx, f.eye_y, rx, ry, n=32)
        else:
            rim = np.array([[-rx, -ry], [rx, -ry], [rx, ry * 0.8], [0.0, ry], [-rx, ry * 0.8]])
            rim = rim + [side * f.eye_dx, f.eye_y]
        p.line(np.concatenate([rim, rim[:1]]), f.frame, 0.022, 0.7)
        arm = np.array(
            [[side * (f.eye_dx + rx), f.eye_y - ry * 0.5], [side * f.face_w * 1.02, f.eye_y - 0.06]]
        )
        p.line(arm, f.frame, 0.02, np.array([0.7, 0.0]))
    bridge = np.array(
        [
            [-(f.eye_dx - rx), f.eye_y - ry * 0.3],
            [0, f.eye_y - ry * 0.5],
            [f.eye_dx - rx, f.eye_y - ry * 0.3],
        ]
    )
    p.line(bridge, f.frame, 0.02, 0.8)


@OCCLUDERS.register("bar")
def _bar(p: _Painter, f: FaceIdentity, u: Sequence[float], color: Color) -> None:
    """A long bar across the image (a pole, a strap, a finger)."""
    angle = u[0] * math.pi
    cx, cy, width = u[1] * 1.2 - 0.6, u[2] * 1.2 - 0.6, 0.08 + 0.17 * u[3]
    d = np.array([math.cos(angle), math.sin(angle)]) * 2.5
    n = np.array([-math.sin(angle), math.cos(angle)]) * width / 2
    centre = np.array([cx, cy])
    p.image_polygon(
        np.stack([centre - d - n, centre + d - n, centre + d + n, centre - d + n]), color
    )


@OCCLUDERS.register("patch")
def _patch(p: _Painter, f: FaceIdentity, u: Sequence[float], color: Color) -> None:
    """A rectangle over part of the face (a hand, a cup, a sticker)."""
    w, h = 0.25 + 0.35 * u[0], 0.25 + 0.35 * u[1]
    cx, cy = u[2] * 1.4 - 0.7, u[3] * 1.4 - 0.6
    p.image_polygon(
        np.array(
            [
                [cx - w / 2, cy - h / 2],
                [cx + w / 2, cy - h / 2],
                [cx + w / 2, cy + h / 2],
                [cx - w / 2, cy + h / 2],
            ]
        ),
        color,
    )


@OCCLUDERS.register("mask")
def _mask(p: _Painter, f: FaceIdentity, u: Sequence[float], color: Color) -> None:
    """A face mask from below the nose bridge to the chin."""
    top = f.nose_y - 0.08 + 0.1 * u[0]
    outline = _face_outline(f, grow=0.015, n=64)
    lower = outline[outline[:, 1] > top]
    lower = lower[np.argsort(-lower[:, 0])]
    x = np.linspace(lower[-1, 0], lower[0, 0], 12)
    y = top - 0.05 * (1 - (x / f.face_w) ** 2)
    light = _mix(color, (235, 240, 245), 0.6 * u[1])
    p.polygon(np.concatenate([lower, np.stack([x, y], axis=1)]), light, 0.6)


@OCCLUDERS.register("sunglasses")
def _sunglasses(p: _Painter, f: FaceIdentity, u: Sequence[float], color: Color) -> None:
    """Dark lenses over both eyes."""
    rx, ry = f.eye_w * (1.5 + 0.4 * u[0]), f.eye_h * 1.6 + 0.06
    lens = _shade(color, 0.25 + 0.2 * u[1])
    for side in (-1, 1):
        p.polygon(_ellipse(side * f.eye_dx, f.eye_y + 0.01, rx, ry, n=28), lens, 0.7)
    p.line(
        np.array([[-f.eye_dx + rx * 0.8, f.eye_y - 0.02], [f.eye_dx - rx * 0.8, f.eye_y - 0.02]]),
        lens,
        0.025,
        0.8,
    )


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(axis, axis)


def _photograph(canvas: Image.Image, v: Nuisance, image_size: int) -> np.ndarray:
    """Camera effects on the rendered scene: blur, lighting, white balance, noise."""
    image = canvas.reduce(SUPERSAMPLE)
    if v.blur:
        image = image.filter(ImageFilter.GaussianBlur(v.blur * image_size / 112))
    x = np.asarray(image, dtype=np.float32)
    gx, gy = _grid(image_size)
    light = 1.0 + v.light_strength * (math.cos(v.light_angle) * gx + math.sin(v.light_angle) * gy)
    x = x * (light * v.brightness)[..., None] * np.asarray(v.white_balance, dtype=np.float32)
    x = (x - x.mean()) * v.contrast + x.mean()
    noise = np.random.default_rng(v.noise_seed).standard_normal(x.shape, dtype=np.float32)
    x = x + noise * v.noise
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render_face(identity: FaceIdentity, nuisance: Nuisance, image_size: int = 112) -> np.ndarray:
    """Renders one image of an identity.

    Args:
        identity: The identity's stable parameters.
        nuisance: The image's variation.
        image_size: Side of the square output in pixels.

    Returns:
        uint8 [image_size, image_size, 3] RGB.
    """
    p = _Painter(image_size, nuisance)
    _draw_background(p, nuisance)
    _draw_body(p, identity, nuisance)
    _draw_head(p, identity)
    _draw_beard(p, identity)
    _draw_nose(p, identity)
    _draw_mouth(p, identity, nuisance)
    _draw_eyes(p, identity, nuisance)
    if identity.glasses:
        _draw_glasses(p, identity)
    if nuisance.occluder:
        OCCLUDERS.get(nuisance.occluder)(p, identity, nuisance.occluder_u, nuisance.occluder_color)
    return _photograph(p.image, nuisance, image_size)


def render_image(
    seed: int, identity_index: int, image_index: int, image_size: int = 112
) -> np.ndarray:
    """Renders image `image_index` of identity `identity_index` of the data set of `seed`.

    Args:
        seed: Data-set seed.
        identity_index: Global identity index (training identities first, then held-out).
        image_index: Image index within the identity.
        image_size: Side of the square output in pixels.

    Returns:
        uint8 [image_size, image_size, 3] RGB, exactly the pixels `generate` encodes.
    """
    return render_face(
        sample_identity(seed, identity_index),
        sample_nuisance(seed, identity_index, image_index),
        image_size,
    )


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Encodes uint8 RGB pixels as the JPEG bytes `generate` writes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def identity_name(identity_index: int) -> str:
    """Folder name of a global identity index, e.g. `id_00042`."""
    return f"id_{identity_index:05d}"


def sample_pairs(
    names: Sequence[str],
    images_per_identity: int,
    nfolds: int,
    pairs_per_fold: int,
    seed: int,
) -> tuple[list[SamePair], list[DifferentPair], int, int]:
    """Draws LFW-style verification pairs whose folds use disjoint identities.

    The identities are split into `nfolds` groups; fold f draws distinct same and
    different pairs from group f only, so no identity is shared between folds.
    When the identities cannot fill the request, the pairs per fold (and, below
    two identities per fold, the number of folds) are reduced.

    Args:
        names: Identity folder names; each has images 0 .. images_per_identity-1.
        images_per_identity: Images per identity (at least 2).
        nfolds: Requested folds.
        pairs_per_fold: Requested same (and as many different) pairs per fold.
        seed: Data-set seed.

    Returns:
        (same pairs, different pairs, folds, pairs per fold), fold-major and sorted
        within each fold.

    Raises:
        ConfigError: With fewer than 2 identities or 2 images per identity.
    """
    m = images_per_identity
    if len(names) < 2 or m < 2:
        raise ConfigError(
            f"pairs need at least 2 identities with 2 images each; got {len(names)} x {m}"
        )
    rng = _rng(seed, _PAIRS_STREAM)
    nfolds = max(1, min(nfolds, len(names) // 2))
    groups = np.array_split(rng.permutation(len(names)), nfolds)
    smallest = min(len(g) for g in groups)
    per_fold = min(
        pairs_per_fold, smallest * m * (m - 1) // 2, smallest * (smallest - 1) // 2 * m * m
    )
    same: list[SamePair] = []
    different: list[DifferentPair] = []
    for group in groups:
        fold_same: set[SamePair] = set()
        while len(fold_same) < per_fold:
            k1, k2 = sorted(int(k) for k in rng.choice(m, 2, replace=False))
            fold_same.add((names[group[rng.integers(len(group))]], k1, k2))
        fold_different: set[DifferentPair] = set()
        while len(fold_different) < per_fold:
            i, j = sorted(int(g) for g in rng.choice(group, 2, replace=False))
            k1, k2 = (int(k) for k in rng.integers(m, size=2))
            fold_different.add((names[i], k1, names[j], k2))
        same += sorted(fold_same)
        different += sorted(fold_different)
    return same, different, nfolds, per_fold


def _render_identity(task: tuple[str, str, int, int, int, int]) -> int:
    """Renders and writes every image of one identity; runs in worker processes."""
    root, split, identity_index, images, seed, image_size = task
    identity = sample_identity(seed, identity_index)
    folder = Path(root) / split / identity_name(identity_index)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(images):
        pixels = render_face(identity, sample_nuisance(seed, identity_index, k), image_size)
        (folder / f"{k}.jpg").write_bytes(encode_jpeg(pixels))
    return images


def _check_output(out: Path) -> bool:
    """Whether `out` holds a previous synthetic data set to replace (False: nothing there)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"--output {out} exists and is not a directory; choose another --output")
    if not any(out.iterdir()):
        return False
    if not (out / "synthetic.json").is_file():
        raise DataError(
            f"--output {out} is a non-empty directory without synthetic.json; refusing to replace "
            f"it: choose an empty or new --output"
        )
    return True


def generate(
    out_dir: str | os.PathLike,
    num_identities: int,
    images_per_identity: int,
    num_test_identities: int,
    seed: int = 0,
    image_size: int = 112,
    workers: int = 1,
    pairs_folds: int = 10,
    pairs_per_fold: int = 300,
    landmarks: bool = False,
) -> dict[str, object]:
    """Generates the synthetic data set: train/ and test/ image folders, pairs.txt, synthetic.json.

    The tree is built in a temporary directory beside `out_dir` and renamed into
    place when complete. A previous synthetic data set at `out_dir` (recognised by
    its synthetic.json) is replaced, anything else there is an error.

    Args:
        out_dir: Destination directory.
        num_identities: Training identities (id_00000 ...).
        images_per_identity: Images of every identity, train and test.
        num_test_identities: Held-out identities, numbered after the training ones.
        seed: Seed; the same seed gives byte-identical files.
        image_size: Side of the square images in pixels.
        workers: Rendering processes; does not change the output.
        pairs_folds: Requested folds of pairs.txt.
        pairs_per_fold: Requested same (and as many different) pairs per fold.
        landmarks: Also write landmarks.csv, the five points of every image
            (`LANDMARKS_FILE`); the images are the same either way.

    Returns:
        Summary: counts, effective pairs layout, seconds and images per second.

    Raises:
        ConfigError: On counts that cannot make a data set.
        DataError: If `out_dir` is occupied by something other than a synthetic data set.
    """
    for name, value, low in (
        ("identities", num_identities, 1),
        ("images_per_identity", images_per_identity, 2),
        ("test_identities", num_test_identities, 2),
        ("image_size", image_size, 32),
        ("workers", workers, 1),
        ("pairs_folds", pairs_folds, 1),
        ("pairs_per_fold", pairs_per_fold, 1),
    ):
        if value < low:
            raise ConfigError(f"--{name} must be at least {low}, got {value}")
    out = Path(out_dir)
    replace = _check_output(out)
    start = time.perf_counter()
    test_names = [identity_name(num_identities + j) for j in range(num_test_identities)]
    same, different, nfolds, per_fold = sample_pairs(
        test_names, images_per_identity, pairs_folds, pairs_per_fold, seed
    )
    total = (num_identities + num_test_identities) * images_per_identity
    with atomic_path(out) as tmp:
        tasks = [
            (str(tmp), "train", i, images_per_identity, seed, image_size)
            for i in range(num_identities)
        ]
        tasks += [
            (str(tmp), "test", num_identities + j, images_per_identity, seed, image_size)
            for j in range(num_test_identities)
        ]
        with tqdm(total=total, unit="img", desc="synthetic", disable=None) as bar:
            if workers == 1:
                for done in map(_render_identity, tasks):
                    bar.update(done)
            else:
                with multiprocessing.get_context().Pool(workers) as pool:
                    for done in pool.imap_unordered(_render_identity, tasks, chunksize=4):
                        bar.update(done)
        write_pairs(tmp / "pairs.txt", same, different, nfolds)
        meta = {
            "version": GENERATOR_VERSION,
            "seed": seed,
            "num_identities": num_identities,
            "images_per_identity": images_per_identity,
            "num_test_identities": num_test_identities,
            "image_size": image_size,
            "pairs_folds": nfolds,
            "pairs_per_fold": per_fold,
        }
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
        if landmarks:
            splits = [("train", i) for i in range(num_identities)]
            splits += [("test", num_identities + j) for j in range(num_test_identities)]
            write_landmarks(tmp / LANDMARKS_FILE, splits, images_per_identity, seed, image_size)
        if replace:
            # Move the old tree aside only now, so a failed run leaves it intact.
            trash = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, trash)
    if replace:
        shutil.rmtree(trash)
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "train_identities": num_identities,
        "test_identities": num_test_identities,
        "images_per_identity": images_per_identity,
        "images": total,
        "image_size": image_size,
        "pairs": f"{nfolds} folds x ({per_fold} same + {per_fold} different)",
        "seconds": round(seconds, 2),
        "images_per_second": round(total / max(seconds, 1e-9), 1),
    }


def write_landmarks(path: str | os.PathLike, identities: Sequence[tuple[str, int]],
                    images_per_identity: int, seed: int, image_size: int) -> None:
    """Writes the five points of every image of `identities` as a CSV (`LANDMARKS_HEADER`).

    Args:
        path: The CSV file.
        identities: (split folder, global identity index) of each identity.
        images_per_identity: Images of each identity.
        seed: Data-set seed.
        image_size: Side of the images in pixels.
    """
    lines = [",".join(LANDMARKS_HEADER)]
    for split, index in identities:
        identity = sample_identity(seed, index)
        for k in range(images_per_identity):
            points = face_landmarks(identity, sample_nuisance(seed, index, k), image_size)
            name = f"{split}/{identity_name(index)}/{k}.jpg"
            lines.append(",".join([name, *(f"{p:.3f}" for p in points.ravel())]))
    Path(path).write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.data.synthetic`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--output", required=True, help="Output directory.")
    deprecated_alias(parser, "--out", "--output")
    parser.add_argument("--identities", type=int, default=1000, help="Training identities.")
    parser.add_argument("--images_per_identity", type=int, default=20, help="Images per identity.")
    deprecated_alias(parser, "--images", "--images_per_identity")
    parser.add_argument("--test_identities", type=int, default=100, help="Held-out identities.")
    parser.add_argument("--seed", type=int, default=0, help="Seed; same seed, same bytes.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Processes.")
    parser.add_argument("--image_size", type=int, default=112, help="Image side in pixels.")
    parser.add_argument("--pairs_folds", type=int, default=10, help="Folds of pairs.txt.")
    parser.add_argument(
        "--pairs_per_fold",
        type=int,
        default=300,
        help="Same (and different) pairs per fold; reduced if the test set is small.",
    )
    parser.add_argument("--write_landmarks", action="store_true",
                        help=f"Also write {LANDMARKS_FILE}: the five points of every image.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: parses flags, generates, prints the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    summary = generate(
        args.output,
        args.identities,
        args.images_per_identity,
        args.test_identities,
        seed=args.seed,
        image_size=args.image_size,
        workers=args.workers,
        pairs_folds=args.pairs_folds,
        pairs_per_fold=args.pairs_per_fold,
        landmarks=args.write_landmarks,
    )
    print(format_summary("synthetic identities", list(summary.items())))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
