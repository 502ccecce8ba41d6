"""Synthetic blood-smear cohorts with exact ground truth.

Fields are rendered physically: each object contributes an optical density (OD) per RGB channel
and the transmitted image is ``background * illumination * exp(-sum OD)`` (Beer-Lambert), so
overlapping cells darken naturally. Every object is rendered on its own bounding-box patch, which
keeps an 800x600 field with a few hundred cells well under half a second.

Geometry is expressed as a signed distance to the cell outline (pixels, positive inside). The
truth mask of an object is ``signed distance >= 0``; the rendered edge is a rounded rim whose half
height lies on that outline, so the outline is where the blurred image has half the rim contrast.
Where objects overlap, the one placed later owns the pixels in the instance label image.

Morphology sizes follow standard haematology references (normal RBC 7.5 um, spherocytes ~6 um,
microcytes < 6 um, macrocytes > 9 um, WBC 12-16 um, platelets 2-3 um).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pandas as pd

from rbcbatch.vocabulary import MORPHOLOGY_CLASSES, OBJECT_KINDS

__all__ = [
    "CELL_TYPES",
    "CONDITIONS",
    "SITES",
    "Field",
    "patient_profile",
    "render_field",
    "synth_cohort",
]

# Acquisition sites. OD vectors are per unit of relative thickness (a normal discocyte rim = 1);
# values were chosen so that RBCs, nuclei and background look like Wright- resp. Giemsa-stained
# smears; site_b's RBC OD and background are close to those measured on the AneRBC-I images
# (RBC OD about (0.21, 0.25, 0.10) on a grey-lavender background, magenta nuclei with OD about
# (0.6, 2.4, 0.25)).
SITES: dict[str, dict[str, Any]] = {
    "site_a": {
        "um_per_px": 0.25,
        "scanner": "scanA",
        "stain": "wright",
        "background_rgb": (240.0, 235.0, 226.0),
        "rbc_od": (0.16, 0.40, 0.27),
        "nucleus_od": (0.95, 1.35, 0.45),
        "cytoplasm_od": (0.10, 0.17, 0.10),
        "platelet_od": (0.55, 0.95, 0.25),
        "vignetting": (0.02, 0.10),  # fractional darkening at the corners
        "noise_sd": (1.0, 2.5),  # grey levels
        "blur_sigma_px": (0.5, 1.2),
        "jpeg_quality": 92,
        "stain_shift": 0.0,
    },
    "site_b": {
        "um_per_px": 0.20,
        "scanner": "scanB",
        "stain": "giemsa",
        "background_rgb": (212.0, 214.0, 226.0),
        "rbc_od": (0.26, 0.31, 0.12),
        "nucleus_od": (0.65, 1.85, 0.30),
        "cytoplasm_od": (0.14, 0.15, 0.07),
        "platelet_od": (0.35, 0.95, 0.20),
        "vignetting": (0.04, 0.12),
        "noise_sd": (1.5, 3.0),
        "blur_sigma_px": (0.6, 1.2),
        "jpeg_quality": 92,
        "stain_shift": 0.0,
    },
}

# Direction in which a positive stain_shift moves colour: multipliers on the RBC / platelet /
# nucleus OD per channel and an additive background offset (grey levels), both per unit shift.
# One unit moves the RBC hue towards blue-violet about as far as site_a is from site_b.
STAIN_SHIFT_OD = (0.45, -0.25, -0.45)
STAIN_SHIFT_BACKGROUND = (-14.0, -6.0, 10.0)

# Per-class shape and density. diam: equivalent diameter (um) mean and SD of a normal patient;
# ratio: long/short axis range; density: OD relative to a normal rim; pallor: radius of the
# central pallor as a fraction of the cell radius (pallor diameter / cell diameter) and its depth;
# wobble: amplitude of boundary irregularity (fraction of the radius).
CELL_TYPES: dict[str, dict[str, Any]] = {
    "normal": {
        "diam": (7.5, 0.5),
        "ratio": (1.0, 1.12),
        "density": (0.95, 1.1),
        "pallor": (0.30, 0.37),
        "depth": (0.40, 0.55),
        "wobble": 0.02,
    },
    "spherocyte": {
        "diam": (6.0, 0.4),
        "ratio": (1.0, 1.08),
        "density": (1.35, 1.6),
        "pallor": None,
        "depth": (0.0, 0.0),
        "wobble": 0.015,
    },
    "elliptocyte": {
        "diam": (7.0, 0.5),
        "ratio": (1.4, 2.5),
        "density": (0.9, 1.05),
        "pallor": (0.25, 0.32),
        "depth": (0.2, 0.35),
        "wobble": 0.02,
    },
    "target": {
        "diam": (7.8, 0.5),
        "ratio": (1.0, 1.1),
        "density": (0.95, 1.1),
        "pallor": (0.55, 0.65),
        "depth": (0.55, 0.7),
        "wobble": 0.02,
    },
    "schistocyte": {
        "diam": (6.0, 0.6),  # diameter of the disk before it is cut
        "ratio": (1.0, 1.2),
        "density": (1.1, 1.35),
        "pallor": None,
        "depth": (0.0, 0.0),
        "wobble": 0.03,
    },
    "microcyte": {
        "diam": (5.8, 0.35),
        "ratio": (1.0, 1.12),
        "density": (0.9, 1.05),
        "pallor": (0.30, 0.38),
        "depth": (0.40, 0.55),
        "wobble": 0.02,
    },
    "macrocyte": {
        "diam": (9.5, 0.5),
        "ratio": (1.0, 1.15),
        "density": (1.0, 1.15),
        "pallor": (0.22, 0.30),
        "depth": (0.25, 0.4),
        "wobble": 0.02,
    },
    "hypochromic": {
        "diam": (7.3, 0.5),
        "ratio": (1.0, 1.15),
        "density": (0.6, 0.75),
        "pallor": (0.55, 0.70),
        "depth": (0.65, 0.8),
        "wobble": 0.025,
    },
    "other": {  # crenated / irregular poikilocytes
        "diam": (7.2, 0.7),
        "ratio": (1.0, 1.35),
        "density": (0.95, 1.15),
        "pallor": (0.2, 0.3),
        "depth": (0.15, 0.3),
        "wobble": 0.07,
    },
}

# Patient conditions. mix: expected fraction of each RBC class (ranges are drawn once per
# patient; "normal" takes the remainder); size_scale multiplies every RBC diameter; size_sd scales
# the diameter SD (anisocytosis); ellipto_ratio: axis-ratio range of elliptocytes. HS: 15-40 %
# spherocytes; IDA: microcytic hypochromic picture with pencil cells and a few target cells.
CONDITIONS: dict[str, dict[str, Any]] = {
    "normal": {
        "mix": {
            "spherocyte": (0.005, 0.015),
            "elliptocyte": (0.005, 0.015),
            "target": (0.0, 0.01),
            "schistocyte": (0.0, 0.008),
            "microcyte": (0.005, 0.015),
            "macrocyte": (0.005, 0.015),
            "hypochromic": (0.0, 0.01),
            "other": (0.005, 0.015),
        },
        "size_scale": 1.0,
        "size_sd": 1.0,
        "ellipto_ratio": (1.4, 2.0),
    },
    "hs": {
        "mix": {
            "spherocyte": (0.15, 0.40),
            "elliptocyte": (0.005, 0.015),
            "target": (0.0, 0.01),
            "schistocyte": (0.005, 0.02),
            "microcyte": (0.01, 0.03),
            "macrocyte": (0.005, 0.02),
            "hypochromic": (0.0, 0.01),
            "other": (0.005, 0.02),
        },
        "size_scale": 0.97,
        "size_sd": 1.15,
        "ellipto_ratio": (1.4, 2.0),
    },
    "ida": {
        "mix": {
            "spherocyte": (0.0, 0.01),
            "elliptocyte": (0.05, 0.12),
            "target": (0.03, 0.08),
            "schistocyte": (0.005, 0.02),
            "microcyte": (0.20, 0.35),
            "macrocyte": (0.0, 0.01),
            "hypochromic": (0.15, 0.30),
            "other": (0.01, 0.03),
        },
        "size_scale": 0.93,
        "size_sd": 1.6,
        "ellipto_ratio": (1.8, 2.5),
    },
}

CONDITION_ORDER: tuple[str, ...] = ("normal", "hs", "ida")
SITE_ORDER: tuple[str, ...] = ("site_a", "site_b")

# Layout of the monolayer ("feathered edge" reading area): red cells cover 30-40 % of a field
# (AneRBC-I masks: 35-48 %); each new cell is placed free, touching or overlapping a neighbour.
RBC_COVERAGE = (0.30, 0.40)
PLACEMENT_MODES = {"separate": 0.70, "touching": 0.18, "overlapping": 0.12}
TOUCH_DEPTH = (0.0, 0.05)  # fraction of the summed radii by which touching cells interpenetrate
OVERLAP_DEPTH = (0.05, 0.18)  # overlapping a little: the lens is at most ~1/3 of a radius wide
MIN_VISIBLE = 0.75  # every object keeps at least this fraction of its area unoccluded
SEPARATE_GAP_PX = 1.5  # free cells keep at least this many pixels of background between them
TRIES_PER_CELL = 20  # positions tried for one cell before it is discarded
MAX_FAILED_SPECS = 60  # the field is full once this many cells could not be placed

SCHISTOCYTE_DIAM_UM = (3.0, 6.0)  # equivalent diameter of a fragment
WBC_DIAM_UM = (12.0, 16.0)
WBC_MEAN_PER_FIELD = 0.8  # Poisson mean, capped at WBC_MAX_PER_FIELD
WBC_MAX_PER_FIELD = 3
PLATELET_DIAM_UM = (2.0, 3.0)
PLATELET_MEAN_PER_FIELD = 4.0
PLATELET_MAX_PER_FIELD = 8

# Per-field imaging jitter.
STAIN_JITTER_SD = 0.04  # relative SD of each OD channel
STAIN_STRENGTH = (0.9, 1.1)  # global OD scale (staining time / smear thickness)
BACKGROUND_JITTER = 4.0  # grey levels, uniform +-
EDGE_SOFTNESS_PX = 0.5  # half-width of the anti-aliased outline of nuclei
# Rounded cell edges: the RBC rim is ~2 um thick, so its edge rounds off over ~0.8 um; the flat
# WBC cytoplasm thins out more gradually, a platelet's edge is sharper. RIM_HALF_OFFSET puts half
# the rim height on the outline.
RBC_RIM_UM = 0.8
WBC_RIM_UM = 1.0
PLATELET_RIM_UM = 0.4
RIM_HALF_OFFSET = 1.0 - math.sqrt(0.75)


# Slide file formats: every 5th slide (index 3, 8, ...) is a JPEG; the 6th slide is PNG data saved
# under a .jpg name, as found in real archives.
JPEG_EVERY = 5
JPEG_OFFSET = 3
PNG_AS_JPG_INDEX = 5

# Output tables.
CATALOG_COLUMNS = [
    "slide_id",
    "uri",
    "patient_id",
    "site",
    "scanner",
    "stain",
    "um_per_px",
    "cohort",
    "label",
]
TRUTH_COLUMNS = [
    "slide_id",
    "patient_id",
    "site",
    "condition",
    "cell_id",
    "kind",
    "cell_class",
    "centroid_x",
    "centroid_y",
    "area_um2",
    "full_area_um2",
    "diameter_um",
    "visible_fraction",
    "touches_border",
]


@dataclass(frozen=True)
class Field:
    """One rendered field: RGB image (uint8 HxWx3), instance labels (uint32 HxW), per-object truth.

    ``cells[i]["cell_id"]`` is the label value of the object; ids are 1..n in drawing order.
    """

    image: np.ndarray
    labels: np.ndarray
    cells: list[dict] = field(default_factory=list)


@dataclass
class _Obj:
    """A rendered object on its bounding-box patch (internal)."""

    kind: str
    cell_class: str
    sd: np.ndarray  # (h, w) float32 signed distance to the outline, px, >0 inside
    od: np.ndarray  # (h, w, 3) float32 optical density
    radius_px: float  # equivalent radius of the full shape
    fx: float  # sub-pixel offset of the shape centre within its integer anchor
    fy: float
    half: int  # patch is (2*half+1) square around the anchor
    x: int = 0  # integer anchor on the canvas
    y: int = 0

    @property
    def mask(self) -> np.ndarray:
        return self.sd >= 0.0


def patient_profile(rng: np.random.Generator, condition: str) -> dict[str, Any]:
    """Draw one patient's RBC class mix and size parameters from ``CONDITIONS[condition]``."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {sorted(CONDITIONS)}")
    spec = CONDITIONS[condition]
    mix = {cls: float(rng.uniform(*rng_range)) for cls, rng_range in spec["mix"].items()}
    mix["normal"] = max(0.0, 1.0 - sum(mix.values()))
    total = sum(mix.values())
    return {
        "condition": condition,
        "mix": {cls: mix.get(cls, 0.0) / total for cls in MORPHOLOGY_CLASSES},
        "size_scale": float(spec["size_scale"]),
        "size_sd": float(spec["size_sd"]),
        "ellipto_ratio": tuple(spec["ellipto_ratio"]),
    }


def _site_colours(rng: np.random.Generator, site: dict[str, Any], shift: float) -> dict:
    """Per-field stain and background colours (jittered around the site's, moved by ``shift``)."""
    mult = np.exp(shift * np.asarray(STAIN_SHIFT_OD))
    strength = rng.uniform(*STAIN_STRENGTH)

    def jitter(vec: tuple[float, float, float]) -> np.ndarray:
        noise = 1.0 + STAIN_JITTER_SD * rng.standard_normal(3)
        return (np.asarray(vec) * mult * noise * strength).astype(np.float32)

    bg = np.asarray(site["background_rgb"]) + shift * np.asarray(STAIN_SHIFT_BACKGROUND)
    bg = bg + rng.uniform(-BACKGROUND_JITTER, BACKGROUND_JITTER, 3)
    return {
        "rbc": jitter(site["rbc_od"]),
        "nucleus": jitter(site["nucleus_od"]),
        "cytoplasm": jitter(site["cytoplasm_od"]),
        "platelet": jitter(site["platelet_od"]),
        "background": np.clip(bg, 60.0, 255.0).astype(np.float32),
    }


def _ellipse_geometry(
    a_px: float, b_px: float, angle: float, wobble: np.ndarray, fx: float, fy: float, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance (px) and normalised radius of a wobbly ellipse on a (2*half+1)^2 patch.

    ``wobble`` is (k, 2): amplitude and phase of boundary harmonics 2..k+1. Returns (sd, rho,
    u, v) with u, v the pixel coordinates in the ellipse frame (px), all float32 (h, w).
    """
    coords = np.arange(-half, half + 1, dtype=np.float32)
    dx = coords[None, :] - np.float32(fx)
    dy = coords[:, None] - np.float32(fy)
    c, s = math.cos(angle), math.sin(angle)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    un, vn = u / a_px, v / b_px
    rho = np.sqrt(un * un + vn * vn) + 1e-6
    if len(wobble):
        theta = np.arctan2(vn, un)
        bump = np.ones_like(rho)
        for k, (amp, phase) in enumerate(wobble, start=2):
            bump += amp * np.cos(k * theta + phase)
        rho = rho / bump
    # First-order distance to the outline: (1 - rho) / |grad rho| of the plain ellipse.
    grad = np.sqrt((un / a_px) ** 2 + (vn / b_px) ** 2) / rho + 1e-6
    sd = (1.0 - rho) / grad
    return sd.astype(np.float32), rho.astype(np.float32), u, v


def _wobble(rng: np.random.Generator, amplitude: float, n: int = 4) -> np.ndarray:
    amps = amplitude * rng.uniform(0.3, 1.0, n) / np.sqrt(np.arange(1, n + 1))
    return np.stack([amps, rng.uniform(0, 2 * np.pi, n)], axis=1)


def _coverage(sd: np.ndarray) -> np.ndarray:
    """Anti-aliased area coverage in [0, 1] from a signed distance (px)."""
    return np.clip(sd / (2 * EDGE_SOFTNESS_PX) + 0.5, 0.0, 1.0)


def _rim(sd: np.ndarray, width_px: float) -> np.ndarray:
    """Rounded edge profile in [0, 1]: a semicircular rim of ``width_px``, half height at sd = 0.

    The truth outline (sd = 0) is thus where the cell is half as thick as its rim, which is also
    where the blurred image reaches half its rim contrast.
    """
    x = np.clip((sd + RIM_HALF_OFFSET * width_px) / width_px, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - (1.0 - x) ** 2, 0.0, 1.0))


def _rbc_thickness(rho: np.ndarray, cls: str, params: dict[str, float]) -> np.ndarray:
    """Relative thickness (1 = normal rim) of a red cell's interior as a function of ``rho``."""
    r = np.clip(rho, 0.0, 1.0)
    t = params["density"] * np.ones_like(r)
    if cls == "spherocyte" or cls == "schistocyte":
        return t * (0.85 + 0.15 * np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0)))
    pallor = params["pallor"]
    t = t * (1.0 - params["depth"] * np.exp(-((r / pallor) ** 4)))
    if cls == "target":  # dense central spot inside the pallor ring
        spot = params["spot"]
        t = t + params["density"] * params["spot_amp"] * np.exp(-((r / spot) ** 2))
    return t


def _sample_rbc(
    rng: np.random.Generator, cls: str, profile: dict[str, Any], um_per_px: float
) -> tuple[float, float, float, dict[str, float]]:
    """Draw size (semi-axes in px), orientation and profile parameters of one red cell."""
    spec = CELL_TYPES[cls]
    mean, sd = spec["diam"]
    sd = sd * profile["size_sd"]
    scale = profile["size_scale"] if cls != "schistocyte" else 1.0
    diam = float(np.clip(rng.normal(mean * scale, sd), 0.6 * mean, 1.4 * mean))
    lo, hi = profile["ellipto_ratio"] if cls == "elliptocyte" else spec["ratio"]
    ratio = float(rng.uniform(lo, hi))
    r_px = diam / 2.0 / um_per_px
    a_px, b_px = r_px * math.sqrt(ratio), r_px / math.sqrt(ratio)
    params = {"density": float(rng.uniform(*spec["density"]))}
    if spec["pallor"] is not None:
        params["pallor"] = float(rng.uniform(*spec["pallor"]))
        params["depth"] = float(rng.uniform(*spec["depth"]))
    if cls == "target":
        params["spot"] = float(rng.uniform(0.15, 0.22))
        params["spot_amp"] = float(rng.uniform(0.7, 1.0))
    return a_px, b_px, float(rng.uniform(0, np.pi)), params


def _schistocyte_cuts(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, r_px: float
) -> np.ndarray:
    """Signed distance of the cuts that turn a disk into a fragment (chords, triangle, helmet)."""
    style = rng.choice(["chord", "triangle", "helmet"], p=[0.45, 0.25, 0.30])
    if style == "helmet":  # a bite taken out by a concave arc, plus one straight chord
        phi = rng.uniform(0, 2 * np.pi)
        bite_r = r_px * rng.uniform(0.7, 1.0)
        dist = r_px * rng.uniform(1.05, 1.35)
        bx, by = dist * math.cos(phi), dist * math.sin(phi)
        sd_bite = np.sqrt((u - bx) ** 2 + (v - by) ** 2) - bite_r
        phi2 = phi + np.pi + rng.uniform(-0.6, 0.6)
        offset = r_px * rng.uniform(0.45, 0.75)
        sd_chord = offset - (u * math.cos(phi2) + v * math.sin(phi2))
        return np.minimum(sd_bite, sd_chord)
    n_cuts = {"chord": int(rng.integers(1, 3)), "triangle": 3}[style]
    base = rng.uniform(0, 2 * np.pi)
    sd = np.full(u.shape, np.inf, dtype=np.float32)
    # Chords of a two-cut fragment meet at an angle (wedge), not in parallel (sliver).
    step = 2 * np.pi / 3 if style == "triangle" else rng.uniform(1.3, 2.4)
    for i in range(n_cuts):
        phi = base + step * i + rng.uniform(-0.3, 0.3)
        lo, hi = (0.1, 0.5) if style == "chord" else (0.3, 0.55)
        offset = r_px * rng.uniform(lo, hi)
        sd = np.minimum(sd, offset - (u * math.cos(phi) + v * math.sin(phi)))
    return sd


def _cut_fragment(
    rng: np.random.Generator,
    sd: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    r_px: float,
    um_per_px: float,
) -> np.ndarray:
    """Cut a disk into a fragment whose equivalent diameter lies in SCHISTOCYTE_DIAM_UM."""
    lo, hi = SCHISTOCYTE_DIAM_UM
    cut = sd
    for _ in range(20):
        cut = np.minimum(sd, _schistocyte_cuts(rng, u, v, r_px))
        diam = 2.0 * math.sqrt(float((cut >= 0).sum()) / math.pi) * um_per_px
        if lo <= diam <= hi:
            break
    return cut


def _make_rbc(
    rng: np.random.Generator,
    cls: str,
    profile: dict[str, Any],
    um_per_px: float,
    colours: dict[str, np.ndarray],
) -> _Obj:
    a_px, b_px, angle, params = _sample_rbc(rng, cls, profile, um_per_px)
    wob = _wobble(rng, CELL_TYPES[cls]["wobble"])
    half = int(math.ceil(a_px * (1.0 + 2 * CELL_TYPES[cls]["wobble"]))) + 3
    fx, fy = rng.uniform(0, 1, 2)
    sd, rho, u, v = _ellipse_geometry(a_px, b_px, angle, wob, fx, fy, half)
    if cls == "schistocyte":
        sd = _cut_fragment(rng, sd, u, v, math.sqrt(a_px * b_px), um_per_px)
    thick = _rbc_thickness(rho, cls, params) * _rim(sd, RBC_RIM_UM / um_per_px)
    od = thick[..., None] * colours["rbc"][None, None, :]
    area = float((sd >= 0).sum())
    return _Obj("rbc", cls, sd, od.astype(np.float32), math.sqrt(area / np.pi), fx, fy, half)


def _make_wbc(rng: np.random.Generator, um_per_px: float, colours: dict[str, np.ndarray]) -> _Obj:
    """A leukocyte: pale cytoplasm with a lobulated (neutrophil) or round (lymphocyte) nucleus."""
    diam = rng.uniform(*WBC_DIAM_UM)
    r_px = diam / 2.0 / um_per_px
    ratio = rng.uniform(1.0, 1.12)
    a_px, b_px = r_px * math.sqrt(ratio), r_px / math.sqrt(ratio)
    half = int(math.ceil(a_px * 1.06)) + 3
    fx, fy = rng.uniform(0, 1, 2)
    sd, rho, u, v = _ellipse_geometry(
        a_px, b_px, rng.uniform(0, np.pi), _wobble(rng, 0.02), fx, fy, half
    )
    cover = _coverage(sd)
    cyto = _rim(sd, WBC_RIM_UM / um_per_px)
    nucleus = np.zeros_like(sd)
    if rng.uniform() < 0.6:  # neutrophil: 2-5 lobes along an arc
        n_lobes = int(rng.integers(2, 6))
        arc_r = r_px * rng.uniform(0.3, 0.45)
        start = rng.uniform(0, 2 * np.pi)
        span = rng.uniform(2.0, 4.0)
        for i in range(n_lobes):
            phi = start + span * i / max(n_lobes - 1, 1)
            lr = r_px * rng.uniform(0.22, 0.3)
            cx, cy = arc_r * math.cos(phi), arc_r * math.sin(phi)
            lobe = lr - np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
            nucleus = np.maximum(nucleus, _coverage(lobe))
    else:  # lymphocyte / monocyte: one large round to kidney-shaped nucleus
        nr = r_px * rng.uniform(0.6, 0.8)
        ox, oy = rng.uniform(-0.15, 0.15, 2) * r_px
        lobe = nr - np.sqrt((u - ox) ** 2 + ((v - oy) * rng.uniform(1.0, 1.25)) ** 2)
        nucleus = _coverage(lobe)
    nucleus *= cover
    # Chromatin texture: smooth random field, +-15 % around the mean density.
    grain = rng.standard_normal(sd.shape).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=0.6 / um_per_px)
    texture = 1.0 + 0.15 * grain / (grain.std() + 1e-6)
    od = (
        cyto[..., None] * colours["cytoplasm"][None, None, :]
        + (nucleus * texture)[..., None] * colours["nucleus"][None, None, :]
    )
    area = float((sd >= 0).sum())
    return _Obj("wbc", "wbc", sd, od.astype(np.float32), math.sqrt(area / np.pi), fx, fy, half)


def _make_platelet(
    rng: np.random.Generator, um_per_px: float, colours: dict[str, np.ndarray]
) -> _Obj:
    """A platelet: small irregular purple blob with a granular centre."""
    r_px = rng.uniform(*PLATELET_DIAM_UM) / 2.0 / um_per_px
    ratio = rng.uniform(1.0, 1.4)
    a_px, b_px = r_px * math.sqrt(ratio), r_px / math.sqrt(ratio)
    half = int(math.ceil(a_px * 1.2)) + 3
    fx, fy = rng.uniform(0, 1, 2)
    sd, rho, _, _ = _ellipse_geometry(
        a_px, b_px, rng.uniform(0, np.pi), _wobble(rng, 0.08), fx, fy, half
    )
    granules = 0.7 + 0.3 * rng.uniform(size=sd.shape).astype(np.float32)
    dens = (
        _rim(sd, PLATELET_RIM_UM / um_per_px)
        * (0.6 + 0.4 * np.clip(1.0 - rho, 0.0, 1.0))
        * granules
    )
    od = dens[..., None] * colours["platelet"][None, None, :]
    area = float((sd >= 0).sum())
    return _Obj(
        "platelet", "platelet", sd, od.astype(np.float32), math.sqrt(area / np.pi), fx, fy, half
    )


class _Canvas:
    """Label canvas with per-object full / visible pixel counts, used for rejection sampling."""

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.zeros((height, width), dtype=np.int32)
        self.full: list[int] = [0]
        self.visible: list[int] = [0]
        self.objs: list[_Obj] = []

    def fits(self, obj: _Obj, x: int, y: int, gap_px: float | None) -> bool:
        """True if ``obj`` anchored at (x, y) stays on the canvas and respects the overlap caps."""
        h = obj.sd.shape[0]
        height, width = self.labels.shape
        if x - obj.half < 0 or y - obj.half < 0 or x + obj.half >= width or y + obj.half >= height:
            return False
        window = self.labels[y - obj.half : y - obj.half + h, x - obj.half : x - obj.half + h]
        if gap_px is not None:  # free cell: nothing within gap_px of its outline
            return not window[obj.sd >= -gap_px].any()
        under = window[obj.mask]
        under = under[under > 0]
        if under.size == 0:
            return True
        ids, counts = np.unique(under, return_counts=True)
        for i, c in zip(ids, counts, strict=True):
            if self.visible[i] - c < MIN_VISIBLE * self.full[i]:
                return False
        return True

    def add(self, obj: _Obj, x: int, y: int) -> None:
        h = obj.sd.shape[0]
        window = self.labels[y - obj.half : y - obj.half + h, x - obj.half : x - obj.half + h]
        mask = obj.mask
        under = window[mask]
        under = under[under > 0]
        if under.size:
            ids, counts = np.unique(under, return_counts=True)
            for i, c in zip(ids, counts, strict=True):
                self.visible[i] -= int(c)
        new_id = len(self.full)
        window[mask] = new_id
        n = int(mask.sum())
        self.full.append(n)
        self.visible.append(n)
        obj.x, obj.y = x, y
        self.objs.append(obj)


def _pixels_in_window(obj: _Obj, pad: int, height: int, width: int) -> int:
    """Pixels of a placed object's mask inside the field window [pad, pad + height/width)."""
    h = obj.sd.shape[0]
    y0, x0 = obj.y - obj.half, obj.x - obj.half
    ys = slice(max(pad - y0, 0), max(min(pad + height - y0, h), 0))
    xs = slice(max(pad - x0, 0), max(min(pad + width - x0, h), 0))
    return int(obj.mask[ys, xs].sum())


def _place_free(
    rng: np.random.Generator, canvas: _Canvas, obj: _Obj, gap_px: float, tries: int
) -> bool:
    height, width = canvas.labels.shape
    for _ in range(tries):
        x = int(rng.integers(obj.half, width - obj.half))
        y = int(rng.integers(obj.half, height - obj.half))
        if canvas.fits(obj, x, y, gap_px):
            canvas.add(obj, x, y)
            return True
    return False


def _place_rbc(rng: np.random.Generator, canvas: _Canvas, obj: _Obj, rbc_idx: list[int]) -> bool:
    """Place one red cell: free with probability 0.70, else touching / overlapping a neighbour."""
    modes = list(PLACEMENT_MODES)
    mode = modes[rng.choice(len(modes), p=list(PLACEMENT_MODES.values()))]
    if mode == "separate" or not rbc_idx:
        return _place_free(rng, canvas, obj, SEPARATE_GAP_PX, TRIES_PER_CELL)
    depth = TOUCH_DEPTH if mode == "touching" else OVERLAP_DEPTH
    for _ in range(TRIES_PER_CELL):
        other = canvas.objs[rbc_idx[int(rng.integers(len(rbc_idx)))]]
        dist = (other.radius_px + obj.radius_px) * (1.0 - rng.uniform(*depth))
        phi = rng.uniform(0, 2 * np.pi)
        cx = other.x + other.fx + dist * math.cos(phi)
        cy = other.y + other.fy + dist * math.sin(phi)
        x, y = int(round(cx - obj.fx)), int(round(cy - obj.fy))
        if canvas.fits(obj, x, y, None):
            canvas.add(obj, x, y)
            return True
    return False


def _illumination(
    rng: np.random.Generator, height: int, width: int, vignetting: float
) -> np.ndarray:
    """Multiplicative illumination field (H, W) float32: radial vignetting plus a weak tilt."""
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    ox, oy = rng.uniform(-0.3, 0.3, 2)
    r2 = ((xs - ox) ** 2 + (ys - oy) ** 2) / 2.0
    tilt = rng.uniform(-0.02, 0.02) * xs + rng.uniform(-0.02, 0.02) * ys
    return (1.0 - vignetting * r2 + tilt).astype(np.float32)


def render_field(
    rng: np.random.Generator,
    condition: str,
    site: str,
    height: int,
    width: int,
    um_per_px: float | None = None,
    *,
    profile: dict[str, Any] | None = None,
    stain_shift: float | None = None,
    jpeg_quality: int | None = None,
) -> Field:
    """Render one smear field of a patient with ``condition`` imaged at ``site``.

    ``um_per_px`` defaults to the site's pixel size; ``profile`` (from ``patient_profile``) fixes
    the patient's cell mix, otherwise one is drawn; ``stain_shift`` overrides the site's;
    ``jpeg_quality`` passes the image through JPEG compression. Returns image uint8 (H, W, 3)
    RGB, labels uint32 (H, W) and the per-object truth.
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {sorted(SITES)}")
    site_p = SITES[site]
    um = float(um_per_px if um_per_px is not None else site_p["um_per_px"])
    shift = float(site_p["stain_shift"] if stain_shift is None else stain_shift)
    if profile is None:
        profile = patient_profile(rng, condition)
    colours = _site_colours(rng, site_p, shift)

    # Render on a padded canvas so that border cells are cut like in a real field of view.
    pad = int(math.ceil(WBC_DIAM_UM[1] / 2.0 / um)) + 4
    canvas = _Canvas(height + 2 * pad, width + 2 * pad)
    n_wbc = min(int(rng.poisson(WBC_MEAN_PER_FIELD)), WBC_MAX_PER_FIELD)
    for _ in range(n_wbc):
        _place_free(rng, canvas, _make_wbc(rng, um, colours), SEPARATE_GAP_PX, 50)

    classes = list(MORPHOLOGY_CLASSES)
    probs = np.asarray([profile["mix"][c] for c in classes])
    target_px = rng.uniform(*RBC_COVERAGE) * height * width  # red-cell area inside the field
    covered, failed = 0.0, 0
    rbc_idx: list[int] = []
    while covered < target_px and failed < MAX_FAILED_SPECS:
        cls = classes[rng.choice(len(classes), p=probs)]
        obj = _make_rbc(rng, cls, profile, um, colours)
        if _place_rbc(rng, canvas, obj, rbc_idx):
            rbc_idx.append(len(canvas.objs) - 1)
            covered += _pixels_in_window(canvas.objs[-1], pad, height, width)
        else:
            failed += 1

    n_plt = min(int(rng.poisson(PLATELET_MEAN_PER_FIELD)), PLATELET_MAX_PER_FIELD)
    for _ in range(n_plt):
        _place_free(rng, canvas, _make_platelet(rng, um, colours), SEPARATE_GAP_PX, 50)

    od = np.zeros(canvas.labels.shape + (3,), dtype=np.float32)
    for obj in canvas.objs:
        h = obj.sd.shape[0]
        y0, x0 = obj.y - obj.half, obj.x - obj.half
        od[y0 : y0 + h, x0 : x0 + h] += obj.od
    od = od[pad : pad + height, pad : pad + width]
    labels = canvas.labels[pad : pad + height, pad : pad + width]

    image = _image_formation(rng, od, colours["background"], site_p)
    if jpeg_quality is not None:
        buf = np.frombuffer(_encode(image, ".jpg", jpeg_quality), dtype=np.uint8)
        image = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    labels, cells = _truth(labels, canvas, um)
    return Field(image=image, labels=labels, cells=cells)


def _image_formation(
    rng: np.random.Generator, od: np.ndarray, background: np.ndarray, site: dict[str, Any]
) -> np.ndarray:
    """Beer-Lambert transmission, illumination, optical blur and sensor noise -> uint8 RGB."""
    height, width = od.shape[:2]
    illum = _illumination(rng, height, width, rng.uniform(*site["vignetting"]))
    img = np.exp(-od) * background[None, None, :] * illum[..., None]
    sigma = float(rng.uniform(*site["blur_sigma_px"]))
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)
    noise_sd = float(rng.uniform(*site["noise_sd"]))
    img += noise_sd * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _truth(labels: np.ndarray, canvas: _Canvas, um_per_px: float) -> tuple[np.ndarray, list[dict]]:
    """Relabel visible objects to 1..n and build their truth records."""
    n_obj = len(canvas.full)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n_obj)
    ys, xs = np.indices(labels.shape)
    sum_x = np.bincount(flat, weights=xs.ravel(), minlength=n_obj)
    sum_y = np.bincount(flat, weights=ys.ravel(), minlength=n_obj)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    on_edge = np.zeros(n_obj, dtype=bool)
    on_edge[edge] = True

    lut = np.zeros(n_obj, dtype=np.uint32)
    px_area = um_per_px * um_per_px
    cells: list[dict] = []
    for old in range(1, n_obj):
        if counts[old] == 0:
            continue
        new = len(cells) + 1
        lut[old] = new
        obj = canvas.objs[old - 1]
        full_um2 = canvas.full[old] * px_area
        cells.append(
            {
                "cell_id": new,
                "kind": obj.kind,
                "cell_class": obj.cell_class,
                "centroid_x": float(sum_x[old] / counts[old]),
                "centroid_y": float(sum_y[old] / counts[old]),
                "area_um2": float(counts[old] * px_area),
                "full_area_um2": float(full_um2),
                "diameter_um": float(2.0 * math.sqrt(full_um2 / math.pi)),
                "visible_fraction": float(counts[old] / canvas.full[old]),
                "touches_border": bool(on_edge[old]),
            }
        )
    assert all(c["kind"] in OBJECT_KINDS for c in cells)
    return lut[labels], cells


def _slide_format(index: int, n_slides: int) -> tuple[str, str]:
    """(encoding, file extension) of the ``index``-th slide of a cohort of ``n_slides``."""
    if n_slides >= PNG_AS_JPG_INDEX + 1 and index == PNG_AS_JPG_INDEX:
        return ".png", ".jpg"
    if index % JPEG_EVERY == JPEG_OFFSET:
        return ".jpg", ".jpg"
    return ".png", ".png"


def _encode(image_rgb: np.ndarray, encoding: str, jpeg_quality: int) -> bytes:
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if encoding == ".jpg" else []
    ok, buf = cv2.imencode(encoding, bgr, params)
    if not ok:
        raise RuntimeError(f"could not encode image as {encoding}")
    return buf.tobytes()


def synth_cohort(
    out_dir: str | pathlib.Path,
    n_patients: int,
    images_per_patient: int,
    seed: int,
    height: int = 600,
    width: int = 800,
    conditions: tuple[str, ...] | list[str] | None = None,
    sites: tuple[str, ...] | list[str] | None = None,
    *,
    stain_shift: float | None = None,
) -> pathlib.Path:
    """Write a synthetic cohort (images, truth masks, catalog.csv, truth.parquet) to ``out_dir``.

    Patient i (1-based) gets ``conditions[(i-1) % len]`` and ``sites[(i-1) % len]``. Every slide is
    rendered from its own generator seeded by (seed, patient, slide), so outputs are reproducible.
    Returns the path of catalog.csv.
    """
    if n_patients < 1 or images_per_patient < 1:
        raise ValueError("need at least one patient and one image per patient")
    conditions = tuple(conditions or CONDITION_ORDER)
    sites = tuple(sites or SITE_ORDER)
    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "truth_masks").mkdir(parents=True, exist_ok=True)

    n_slides = n_patients * images_per_patient
    catalog_rows: list[dict] = []
    truth_rows: list[dict] = []
    for p in range(1, n_patients + 1):
        condition = conditions[(p - 1) % len(conditions)]
        site = sites[(p - 1) % len(sites)]
        site_p = SITES[site]
        patient_id = f"P{p:03d}"
        profile = patient_profile(np.random.default_rng([seed, p, 0]), condition)
        for s in range(1, images_per_patient + 1):
            slide_id = f"{patient_id}_S{s}"
            rng = np.random.default_rng([seed, p, s])
            fld = render_field(
                rng, condition, site, height, width, profile=profile, stain_shift=stain_shift
            )
            index = (p - 1) * images_per_patient + (s - 1)
            encoding, ext = _slide_format(index, n_slides)
            rel = f"images/{slide_id}{ext}"
            (out / rel).write_bytes(_encode(fld.image, encoding, site_p["jpeg_quality"]))
            assert fld.labels.max(initial=0) < 65536, "too many objects for a uint16 mask"
            cv2.imwrite(str(out / "truth_masks" / f"{slide_id}.png"), fld.labels.astype(np.uint16))
            catalog_rows.append(
                {
                    "slide_id": slide_id,
                    "uri": rel,
                    "patient_id": patient_id,
                    "site": site,
                    "scanner": site_p["scanner"],
                    "stain": site_p["stain"],
                    "um_per_px": float(site_p["um_per_px"]),
                    "cohort": "synthetic",
                    "label": condition,
                }
            )
            base = {
                "slide_id": slide_id,
                "patient_id": patient_id,
                "site": site,
                "condition": condition,
            }
            truth_rows.extend({**base, **cell} for cell in fld.cells)

    catalog = out / "catalog.csv"
    pd.DataFrame(catalog_rows, columns=CATALOG_COLUMNS).to_csv(catalog, index=False)
    truth = pd.DataFrame(truth_rows, columns=TRUTH_COLUMNS)
    truth.to_parquet(out / "truth.parquet", engine="pyarrow", index=False)
    return catalog
