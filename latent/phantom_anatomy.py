"""Analytic anatomy of the paired MR/CT phantom: tissue table, shape primitives, three regions.

A :class:`Canvas` holds mm coordinates relative to the body centre (``x`` towards the patient's
left, ``y`` posterior, ``z`` superior: ITK's LPS axes, identity direction) and three (z, y, x)
maps that shapes are composited into front to back: CT number, T1w MR signal relative to fat
and a tissue label. Every shape is drawn from a signed distance, so its edge voxels get the
fractional occupancy (partial volume) instead of a staircase. Craniocaudal placement uses an
anatomical coordinate ``t`` (0 = caudal end of the region's anatomy, 1 = cranial end) so that
organs keep their order whatever the scanned range; repetitive structures (vertebrae, ribs)
use absolute mm so they keep realistic heights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Cortical shells (and other thin bone) are never thinner than this many in-plane voxels, so a
#: 4x-downsampling VAE still sees them (one-voxel shells were never learned; docs/models.md) and
#: at least one voxel across every shell is pure cortex (MR-dark despite partial volume).
MIN_CORTEX_VOXELS = 2.5
#: Nominal (adult) cortical shell thickness drawn, and the real thin cortex (vertebrae, ribs,
#: sinus walls) it stands for: a thin-cortex shell drawn thicker than THIN_CORTEX_TRUE_MM gets a
#: proportionally lower HU (same bone mass per area), so coarse grids do not carry several
#: times the real bone (docs/phantom_hu.md). Thick cortices (skull tables, mandible) keep theirs.
CORTEX_MM, THIN_CORTEX_TRUE_MM = 1.5, 1.0
#: Gas pockets and air channels keep at least this radius in voxels for the same reason.
MIN_GAS_VOXELS = 2.0
#: Sub-samples per slice for craniocaudal partial volume.
SUBSLICES = 4


@dataclass(frozen=True)
class Tissue:
    """Nominal tissue properties; ``*_jitter`` is the per-case uniform +- range.

    ``texture_hu`` is the std of smooth within-tissue heterogeneity; ``texture_mr`` scales the
    same field on MR relative to the tissue's signal (its sign sets the MR/CT correlation).
    """

    label: int
    hu: float
    mr: float
    hu_jitter: float = 0.0
    mr_jitter: float = 0.0
    texture_hu: float = 0.0
    texture_mr: float = 0.0


#: Typical values (docs/phantom.md); MR is T1w signal relative to fat = 1.0. Label 0 = outside body.
TISSUES: dict[str, Tissue] = {
    "air": Tissue(1, -1000.0, 0.0),
    "lung": Tissue(2, -850.0, 0.05, 30.0, 0.01, 40.0, 0.3),
    "fat": Tissue(3, -100.0, 1.0, 10.0, 0.0, 8.0, -0.03),
    "muscle": Tissue(4, 45.0, 0.35, 4.0, 0.03, 6.0, 0.04),
    "soft_tissue": Tissue(5, 40.0, 0.42, 6.0, 0.04, 6.0, 0.04),
    "fluid": Tissue(6, 8.0, 0.15, 6.0, 0.03, 3.0, 0.05),
    "liver": Tissue(7, 60.0, 0.50, 5.0, 0.04, 5.0, 0.04),
    "kidney": Tissue(8, 30.0, 0.40, 4.0, 0.03, 5.0, 0.05),
    "spleen": Tissue(9, 45.0, 0.35, 4.0, 0.03, 4.0, 0.04),
    "blood": Tissue(10, 40.0, 0.30, 5.0, 0.15, 3.0, 0.1),
    "white_matter": Tissue(11, 30.0, 0.70, 3.0, 0.04, 2.0, 0.02),
    "grey_matter": Tissue(12, 40.0, 0.55, 3.0, 0.04, 2.0, 0.02),
    "cancellous": Tissue(13, 250.0, 0.70, 80.0, 0.08, 50.0, -0.1),
    "cortical": Tissue(14, 1300.0, 0.03, 250.0, 0.01, 120.0, 0.0),
    "cortical_thin": Tissue(14, 1300.0, 0.03, 250.0, 0.01, 120.0, 0.0),  # HU thinned per case
    "teeth": Tissue(15, 2300.0, 0.01, 400.0, 0.0, 150.0, 0.0),
    "cartilage": Tissue(16, 100.0, 0.30, 15.0, 0.03, 6.0, 0.04),
    "metal": Tissue(17, 8000.0, 0.0),  # far above the scale: clipped to 3071 after blur, as on a scanner
    "gland": Tissue(18, -10.0, 0.65, 15.0, 0.05, 10.0, 0.05),
    "bowel_content": Tissue(19, -60.0, 0.30, 40.0, 0.05, 150.0, 0.3),
}
#: Label id -> tissue name (a label shared by two tissue variants keeps the first name).
LABELS: dict[int, str] = {0: "background"}
for _name, _tissue in TISSUES.items():
    LABELS.setdefault(_tissue.label, _name)
del _name, _tissue
REGIONS = ("AB", "HN", "TH")
#: Craniocaudal length (mm, adult) of each region's anatomy, t = 0 .. 1.
REGION_LENGTH_MM = {"AB": 280.0, "TH": 260.0, "HN": 240.0}


def _ellipse_distance(u, v, gu, gv, unit: float) -> np.ndarray:
    """Signed distance to the curve q(u, v) = 1 in ``unit``s, q = sqrt(u^2 + v^2), from the
    first-order estimate (q - 1) / |grad q|; ``gu, gv`` are the gradient terms u/a, v/b.
    Inputs broadcast (an axis-aligned ellipse keeps them (Z,1,X) and (Z,Y,1): cheap)."""
    q = u * u + v * v
    np.sqrt(q, out=q)
    np.maximum(q, 1e-3, out=q)
    grad = gu * gu + gv * gv
    np.sqrt(grad, out=grad)
    grad *= unit
    np.maximum(grad, 1e-12, out=grad)
    distance = q - 1
    distance *= q
    distance /= grad
    return distance


class Canvas:
    """Coordinates and (z, y, x) maps the region builders paint into.

    Args:
        x, y: column / row centres in mm relative to the body centre.
        t_sub: (Z, SUBSLICES) anatomical coordinate of sub-slice samples.
        z_sub: (Z, SUBSLICES) craniocaudal position in mm of the same samples.
        length_mm: craniocaudal length in mm of t = 0 .. 1.
        scale: in-plane and craniocaudal size factor of the anatomy (1 = adult).
        values: per-case ``tissue -> (HU, relative MR)``.
    """

    def __init__(self, x, y, t_sub, z_sub, length_mm: float, scale: float, values: dict[str, tuple[float, float]]):
        self.length_mm = float(length_mm)
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y, np.float32)
        self.t_sub = np.asarray(t_sub, np.float64)
        self.z_sub = np.asarray(z_sub, np.float64)
        self.t = self.t_sub.mean(axis=1)
        self.z = self.z_sub.mean(axis=1)
        self.pixel = float(abs(self.x[1] - self.x[0]))
        self.slice_mm = float(abs(self.z[1] - self.z[0])) if len(self.z) > 1 else 3.0
        self.scale = float(scale)
        self.values = values
        shape = (len(self.z), len(self.y), len(self.x))
        self.ct = np.full(shape, TISSUES["air"].hu, np.float32)
        self.mr = np.zeros(shape, np.float32)
        self.label = np.zeros(shape, np.uint8)

    # -- sizes and craniocaudal profiles ---------------------------------------------------
    def thick(self, mm: float, voxels: float = MIN_CORTEX_VOXELS) -> float:
        """``mm`` (adult, scaled) but never thinner than ``voxels`` in-plane voxels."""
        return max(mm * self.scale, voxels * self.pixel)

    def cortex(self) -> float:
        """Cortical shell thickness in mm."""
        return cortex_mm(self.pixel, self.scale)

    def span(self, t0: float, t1: float) -> np.ndarray:
        """(Z,) fraction of each slice with ``t0 <= t < t1``."""
        return ((self.t_sub >= t0) & (self.t_sub < t1)).mean(axis=1)

    def ellipsoid(self, tc: float, half: float) -> tuple[np.ndarray, np.ndarray]:
        """(Z,) in-plane radius factor and slice coverage of an ellipsoid centred at t = tc."""
        u = (self.t_sub - tc) / half
        inside = np.abs(u) < 1
        factor = np.sqrt(np.clip(1 - u**2, 0, 1)).max(axis=1)
        return factor, inside.mean(axis=1)

    def interp(self, ts, vs) -> np.ndarray:
        """(Z,) piecewise-linear profile over t (clamped at the ends)."""
        return np.interp(self.t, ts, vs)

    # -- compositing -------------------------------------------------------------------------
    def paint(self, tissue: str, occupancy: np.ndarray, box: tuple[slice, slice, slice]) -> None:
        """Composite ``tissue`` over the maps with fractional ``occupancy`` inside ``box``."""
        hu, mr = self.values[tissue]
        ct, sig, lab = self.ct[box], self.mr[box], self.label[box]
        ct += occupancy * (hu - ct)
        sig += occupancy * (mr - sig)
        lab[occupancy >= 0.5] = TISSUES[tissue].label

    def _per_slice(self, *values):
        return [np.broadcast_to(np.asarray(v, np.float64), self.z.shape) for v in values]

    def _box(self, present, cx, cy, reach_x, reach_y):
        if not present.any():
            return None
        zi = np.flatnonzero(present)
        pad = 2 * self.pixel
        x_lo, x_hi = (cx - reach_x)[present].min() - pad, (cx + reach_x)[present].max() + pad
        y_lo, y_hi = (cy - reach_y)[present].min() - pad, (cy + reach_y)[present].max() + pad
        ix0, ix1 = np.searchsorted(self.x, [x_lo, x_hi])
        iy0, iy1 = np.searchsorted(self.y, [y_lo, y_hi])
        if ix1 <= ix0 or iy1 <= iy0:
            return None
        return slice(zi[0], zi[-1] + 1), slice(iy0, iy1), slice(ix0, ix1)

    def occupancy(self, cx, cy, ax, ay, angle: float = 0.0, weight=1.0):
        """Partial-volume occupancy of per-slice ellipses (mm; radius <= 0 = absent).

        Returns:
            ``(occupancy (z, y, x) float32 inside box, box)`` or ``(None, None)``.
        """
        cx, cy, ax, ay, weight = self._per_slice(cx, cy, ax, ay, weight)
        present = (ax > 0) & (ay > 0) & (weight > 0)
        reach = np.maximum(ax, ay)
        box = self._box(present, cx, cy, reach, reach)
        if box is None:
            return None, None
        zs = box[0]
        col = lambda v: v[zs, None, None].astype(np.float32)  # noqa: E731
        dx = self.x[box[2]][None, None, :] - col(cx)
        dy = self.y[box[1]][None, :, None] - col(cy)
        if angle:
            c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            dx, dy = dx * c + dy * s, dy * c - dx * s
        a, b = col(np.where(present, ax, 1.0)), col(np.where(present, ay, 1.0))
        occ = _ellipse_distance(dx / a, dy / b, dx / a**2, dy / b**2, self.pixel)
        np.subtract(0.5, occ, out=occ)
        np.clip(occ, 0, 1, out=occ)
        occ *= col(np.where(present, weight, 0.0))
        return occ, box

    def ellipse(self, tissue: str, cx, cy, ax, ay, angle: float = 0.0, weight=1.0) -> None:
        """Paint per-slice ellipses (centre, semi-axes in mm; scalars or (Z,) arrays)."""
        occ, box = self.occupancy(cx, cy, ax, ay, angle, weight)
        if occ is not None:
            self.paint(tissue, occ, box)

    def blob(self, tissue, cx, cy, ax, ay, tc, half, angle=0.0, inset=0.0, inset_z=None) -> None:
        """Paint an ellipsoid (in-plane semi-axes mm, craniocaudal centre/half-length in t),
        optionally shrunk by ``inset`` mm in-plane and ``inset_z`` mm (default: same) along z."""
        inset_z = inset if inset_z is None else inset_z
        factor, weight = self.ellipsoid(tc, half - inset_z / self.length_mm)
        self.ellipse(tissue, cx, cy, ax * factor - inset, ay * factor - inset, angle, weight)

    def bone(self, cx, cy, ax, ay, angle=0.0, weight=1.0, interior="cancellous", cortex="cortical_thin"):
        """Cortical shell (>= MIN_CORTEX_VOXELS thick) around ``interior``."""
        self.ellipse(cortex, cx, cy, ax, ay, angle, weight)
        c = self.cortex()
        self.ellipse(interior, cx, cy, np.asarray(ax) - c, np.asarray(ay) - c, angle, weight)

    def arc_frame(self, box, cx, cy, rx, ry):
        """Signed radial distance (mm) to an elliptic curve and |angle| (0 anterior, pi posterior)."""
        zs = box[0]
        col = lambda v: v[zs, None, None].astype(np.float32)  # noqa: E731
        cx, cy, rx, ry = (col(v) for v in self._per_slice(cx, cy, rx, ry))
        dx = self.x[box[2]][None, None, :] - cx
        dy = self.y[box[1]][None, :, None] - cy
        q = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        grad = np.sqrt((dx / rx**2) ** 2 + (dy / ry**2) ** 2) / np.maximum(q, 1e-6)
        radial = (q - 1) / np.maximum(grad, 1e-6)
        theta = np.abs(np.arctan2(dx / rx, -dy / ry))
        return radial, theta, 0.5 * (rx + ry)

    def arc(self, tissue, cx, cy, rx, ry, half_width, theta_lo, theta_hi, weight=1.0, inset=0.0):
        """Band of ``half_width`` mm along an elliptic arc, lo <= |angle| <= hi (0 = anterior)."""
        (weight,) = self._per_slice(weight)
        reach = np.broadcast_to(np.maximum(rx, ry) + half_width, self.z.shape)
        box = self._box(weight > 0, *self._per_slice(cx, cy), reach, reach)
        if box is None:
            return
        radial, theta, mean_r = self.arc_frame(box, cx, cy, rx, ry)
        distance = np.maximum(np.abs(radial) - (half_width - inset), (theta_lo - theta) * mean_r + inset)
        distance = np.maximum(distance, (theta - theta_hi) * mean_r + inset)
        occ = np.clip(0.5 - distance / self.pixel, 0, 1) * weight[box[0], None, None].astype(np.float32)
        self.paint(tissue, occ, box)

    def bone_arc(self, cx, cy, rx, ry, half_width, theta_lo, theta_hi, weight=1.0):
        """Arc-shaped bone (mandible, maxilla): cortical band around a cancellous core."""
        self.arc("cortical", cx, cy, rx, ry, half_width, theta_lo, theta_hi, weight)
        self.arc("cancellous", cx, cy, rx, ry, half_width, theta_lo, theta_hi, weight, self.cortex())


def cortex_mm(pixel_mm: float, scale: float) -> float:
    """Drawn cortical shell thickness: nominal, but at least MIN_CORTEX_VOXELS pixels."""
    return max(CORTEX_MM * scale, MIN_CORTEX_VOXELS * pixel_mm)


def sample_tissue_values(rng: np.random.Generator, pixel_mm: float, scale: float,
                         mr_scale: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """Per-case ``tissue -> (HU, relative MR)``: table values with jitter, centre MR scales, and
    the thin-cortex HU lowered where the drawn shell is thicker than a real thin cortex."""
    mr_scale = mr_scale or {}
    values = {}
    for name, tissue in TISSUES.items():
        hu = tissue.hu + rng.uniform(-1, 1) * tissue.hu_jitter
        mr = max(0.0, tissue.mr + rng.uniform(-1, 1) * tissue.mr_jitter) * mr_scale.get(name, 1.0)
        values[name] = (float(hu), float(mr))
    marrow, (cortical, cortical_mr) = values["cancellous"][0], values["cortical"]
    thinning = min(1.0, THIN_CORTEX_TRUE_MM / cortex_mm(pixel_mm, scale))
    values["cortical_thin"] = (marrow + (cortical - marrow) * thinning, cortical_mr)
    return values


def spine(cv: Canvas, cy, hx, hy, pitch, disc, weight=1.0, phase=0.0) -> dict:
    """Vertebral column at (0, cy): bodies with endplates, discs, arch, processes, canal, cord.

    All sizes in mm (already scaled); ``weight`` (Z,) limits the craniocaudal extent.
    """
    (weight,) = cv._per_slice(weight)
    pos = (cv.z_sub - phase) % pitch
    disc_frac = (pos < disc).mean(axis=1)
    plate = max(2.0, 0.5 * cv.slice_mm)
    endplate = (((pos >= disc) & (pos < disc + plate)) | (pos >= pitch - plate)).mean(axis=1)
    s, c = cv.scale, cv.cortex()
    canal_r = max(8.0 * s, 3 * cv.pixel)
    canal_y = cy + hy + canal_r + 1.5 * s
    lamina = cv.thick(5.0, 2.5)
    level = weight * (1 - disc_frac)
    spinous = cv.thick(4.5, 2.5)
    cv.bone(0.0, canal_y + canal_r + 0.8 * hy, spinous, 0.9 * hy + lamina, weight=level)
    for side in (-1, 1):
        cv.bone(side * (canal_r + 0.7 * hx), canal_y - 0.2 * canal_r, 0.8 * hx, spinous, side * 0.25, level)
    cv.bone(0.0, canal_y, canal_r + lamina, 0.85 * canal_r + lamina, weight=weight * (1 - 0.5 * disc_frac))
    cv.bone(0.0, cy, hx, hy, weight=weight)
    cv.ellipse("cortical_thin", 0.0, cy, hx - c, hy - c, weight=weight * endplate)
    cv.ellipse("cartilage", 0.0, cy, hx, hy, weight=weight * disc_frac)
    cv.ellipse("fluid", 0.0, canal_y, canal_r, 0.85 * canal_r, weight=weight)
    cord = max(4.5 * s, 1.5 * cv.pixel)
    cv.ellipse("white_matter", 0.0, canal_y, cord, 0.8 * cord, weight=weight)
    return {"canal_y": canal_y, "canal_r": canal_r}


def ribs(cv: Canvas, rx, ry, weight, rng, theta_cartilage=0.1 * np.pi, theta_bone=0.3 * np.pi,
         theta_spine=0.9 * np.pi) -> None:
    """Rib cage in the body wall: obliquely descending ribs (cortex + marrow), costal cartilage.

    A voxel at height z and angle theta belongs to the rib whose posterior end is at
    z + drop * (pi - theta) / pi, so ribs fall anteriorly as on a real chest.
    """
    (weight,) = cv._per_slice(weight)
    hw = cv.thick(5.0, 2.6)
    hh = max(6.5 * cv.scale, 1.2 * cv.slice_mm)
    pitch = rng.uniform(24.0, 30.0) * cv.scale
    drop = rng.uniform(50.0, 80.0) * cv.scale
    zero = np.zeros_like(cv.z)
    reach_x, reach_y = np.broadcast_to(rx + hw, cv.z.shape), np.broadcast_to(ry + hw, cv.z.shape)
    box = cv._box(weight > 0, zero, zero, reach_x, reach_y)
    if box is None:
        return
    radial, theta, mean_r = cv.arc_frame(box, zero, zero, rx, ry)
    z = cv.z[box[0], None, None].astype(np.float32)
    along = z + drop * (np.pi - theta) / np.pi - rng.uniform(0, pitch)
    dz = (along + pitch / 2) % pitch - pitch / 2
    w = weight[box[0], None, None].astype(np.float32)
    c = cv.cortex()
    for tissue, lo, hi, inset, inset_z in (
        ("cartilage", theta_cartilage, theta_bone, 0.0, 0.0),
        ("cortical_thin", theta_bone, theta_spine, 0.0, 0.0),
        ("cancellous", theta_bone, theta_spine, c, min(c, 0.4 * hh)),
    ):
        a, b = (hw - inset) / cv.pixel, (hh - inset_z) / cv.slice_mm
        u, v = radial / cv.pixel, dz / cv.slice_mm
        distance = _ellipse_distance(u / a, v / b, u / a**2, v / b**2, 1.0)
        ends = np.maximum((lo - theta), (theta - hi)) * mean_r / cv.pixel + inset / cv.pixel
        occ = np.clip(0.5 - np.maximum(distance, ends), 0, 1) * w
        cv.paint(tissue, occ, box)


# -- regions ---------------------------------------------------------------------------------
#: Head & neck outline (adult mm) over t: neck (0) .. mandible .. maxilla .. orbits .. vertex.
_HN_T = (0.0, 0.22, 0.32, 0.45, 0.58, 0.70, 0.85, 0.95, 1.02, 1.03)
_HN_AX = (58.0, 60.0, 66.0, 70.0, 72.0, 72.0, 68.0, 55.0, 20.0, 0.0)
_HN_AY = (60.0, 62.0, 80.0, 92.0, 95.0, 94.0, 88.0, 70.0, 25.0, 0.0)
_HN_CY = (12.0, 8.0, -8.0, -10.0, -6.0, -2.0, 0.0, 0.0, 0.0, 0.0)


def sample_body(region: str, rng: np.random.Generator, scale: float) -> dict:
    """Outline parameters of one case; ``half_x``/``half_y`` (mm) bound the body in-plane."""
    if region == "AB":
        body = {"ax": rng.uniform(140, 170), "ay": rng.uniform(100, 125), "fat": rng.uniform(10, 35)}
    elif region == "TH":
        body = {"ax": rng.uniform(140, 165), "ay": rng.uniform(95, 120), "fat": rng.uniform(8, 25)}
    elif region == "HN":
        size = rng.uniform(0.93, 1.07)
        body = {"ax": np.multiply(_HN_AX, size), "ay": np.multiply(_HN_AY, size * rng.uniform(0.95, 1.05)),
                "cy": np.multiply(_HN_CY, size), "fat": rng.uniform(4, 9)}
    else:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    body = {k: np.asarray(v) * scale for k, v in body.items()}
    if region == "HN":
        body["half_x"] = float(body["ax"].max())
        body["half_y"] = float(np.max(body["ay"] + np.abs(body["cy"])) + 15 * scale)  # nose
    else:
        body["half_x"], body["half_y"] = float(body["ax"]), float(body["ay"])
    return body


def build_region(cv: Canvas, region: str, body: dict, rng: np.random.Generator) -> dict:
    """Paint one region's anatomy; returns the site (mm, t) where an optional metal object goes."""
    return {"AB": _abdomen, "TH": _thorax, "HN": _head_neck}[region](cv, body, rng)


def _trunk_wall(cv: Canvas, ax, ay, fat_lateral, fat_ap, wall):
    """Skin, subcutaneous fat and muscle wall; returns the cavity semi-axes."""
    skin = 2.0 * cv.scale
    cv.ellipse("soft_tissue", 0.0, 0.0, ax, ay)
    cv.ellipse("fat", 0.0, 0.0, ax - skin, ay - skin)
    cv.ellipse("muscle", 0.0, 0.0, ax - fat_lateral, ay - fat_ap)
    return ax - fat_lateral - wall, ay - fat_ap - wall


def _bowel(cv: Canvas, rng, cx, cy, rx, ry, factor, weight, content: str) -> None:
    """A bowel segment: soft-tissue wall, ``content`` lumen, gas rising anteriorly (supine)."""
    wall = max(2.5 * cv.scale, cv.pixel)
    cv.ellipse("soft_tissue", cx, cy, rx * factor, ry * factor, weight=weight)
    lx, ly = rx - wall, ry - wall
    cv.ellipse(content, cx, cy, lx * factor, ly * factor, weight=weight)
    if content != "air" and rng.random() < 0.6:
        gas = max(0.45 * ly, MIN_GAS_VOXELS * cv.pixel)
        cv.ellipse("air", cx, cy - 0.9 * (ly - gas), 0.8 * lx * factor, gas * factor, weight=weight)


def _abdomen(cv: Canvas, body: dict, rng) -> dict:
    s, L = cv.scale, cv.length_mm
    ax, ay = float(body["ax"]), float(body["ay"])
    fat_l, wall = float(body["fat"]), rng.uniform(10, 16) * s
    fat_ap = fat_l * rng.uniform(0.5, 0.9)
    cav_x, cav_y = _trunk_wall(cv, ax, ay, fat_l, fat_ap, wall)
    cv.ellipse("fat", 0.0, 0.0, cav_x, cav_y)  # visceral fat
    vy, hx, hy = ay - fat_ap - 80 * s, 22 * s, 17 * s
    lumen_min = (MIN_GAS_VOXELS + 1.5) * cv.pixel
    for _ in range(int(rng.integers(8, 14))):  # small-bowel loops
        r = max(rng.uniform(9, 15) * s, lumen_min)
        f, w = cv.ellipsoid(rng.uniform(0.0, 0.6), rng.uniform(15, 40) * s / L)
        content = rng.choice(["fluid", "fluid", "air", "bowel_content"])
        cx, cy = rng.uniform(-0.55, 0.55) * cav_x, rng.uniform(-0.75, 0.0) * cav_y
        _bowel(cv, rng, cx, cy, r, r * rng.uniform(0.7, 1.0), f, w, content)
    for cx, cy, r, top in ((-0.72, -0.05, 20, 0.55), (0.75, 0.1, 16, 0.65)):  # colon
        _bowel(cv, rng, cx * cav_x, cy * cav_y, max(r * s, lumen_min), max(r * s, lumen_min), 1.0,
               cv.span(-9, top), "bowel_content")
    f, w = cv.ellipsoid(0.58, 20 * s / L)
    _bowel(cv, rng, 0.0, -0.55 * cav_y, 0.7 * cav_x, max(18 * s, lumen_min), f, w, "bowel_content")
    cv.blob("liver", -0.42 * cav_x, -0.05 * cav_y, 0.55 * cav_x, 0.8 * cav_y, 0.95, 0.45, -0.3)
    cv.blob("liver", 0.05 * cav_x, -0.45 * cav_y, 0.38 * cav_x, 0.35 * cav_y, 1.0, 0.25, 0.2)
    factor, _ = cv.ellipsoid(0.95, 0.45)
    for _ in range(3):  # hepatic vessels
        phi, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4)
        cx = -0.42 * cav_x + rad * 0.55 * cav_x * factor * np.cos(phi)
        cy = -0.05 * cav_y + rad * 0.8 * cav_y * factor * np.sin(phi)
        r = max(rng.uniform(4, 6) * s, 1.5 * cv.pixel)
        cv.ellipse("blood", cx, cy, r, r, weight=(factor > 0.6).astype(float))
    cv.blob("fluid", -0.25 * cav_x, -0.6 * cav_y, 14 * s, 18 * s, 0.62, 35 * s / L)  # gallbladder
    f, w = cv.ellipsoid(0.92, 0.22)  # stomach
    _bowel(cv, rng, 0.42 * cav_x, -0.35 * cav_y, 0.3 * cav_x, 0.35 * cav_y, f, w,
           str(rng.choice(["fluid", "bowel_content"])))
    cv.blob("spleen", 0.7 * cav_x, 0.35 * cav_y, 0.17 * cav_x, 0.38 * cav_y, 0.85, 0.22, 0.6)
    cv.blob("soft_tissue", 0.1 * cav_x, vy - hy - 30 * s, 0.42 * cav_x, max(11 * s, 2.5 * cv.pixel),
            0.65, 0.1, -0.25)  # pancreas
    for side in (-1, 1):
        kx, ky, tc = side * (hx + 40 * s), vy + 5 * s, 0.45 + 0.04 * side
        cv.blob("kidney", kx, ky, 26 * s, 38 * s, tc, 0.25, -side * 0.45)
        cv.blob("fat", kx - side * 11 * s, ky - 6 * s, 9 * s, 14 * s, tc, 0.15, -side * 0.45)
        psoas = s * cv.interp([0.0, 0.55, 0.8], [24.0, 14.0, 0.0])
        cv.ellipse("muscle", side * (hx + 16 * s), vy + 2 * s, psoas, 0.9 * psoas)
        cv.ellipse("muscle", side * 30 * s, vy + 55 * s, 25 * s, 21 * s)  # paraspinal
    aorta = max(11 * s, 3 * cv.pixel)
    cv.ellipse("blood", 12 * s, vy - hy - aorta - 1 * s, aorta, aorta)
    cv.ellipse("blood", -24 * s, vy - hy - 10 * s, 13 * s, 9 * s)  # inferior vena cava
    pitch = 36 * s
    canal = spine(cv, vy, hx, hy, pitch, 9 * s, phase=rng.uniform(0, pitch))
    ribs(cv, cav_x + 0.5 * wall, cav_y + 0.5 * wall, cv.span(0.6, 9), rng,
         0.22 * np.pi, 0.35 * np.pi, 0.88 * np.pi)
    side = rng.choice([-1, 1])  # pedicle screw
    return {"cx": side * (canal["canal_r"] + 5 * s), "cy": canal["canal_y"] - 12 * s,
            "rx": cv.thick(3.0), "ry": 20 * s, "angle": -side * 0.3, "tc": 0.5, "half_mm": 4.0}


def _thorax(cv: Canvas, body: dict, rng) -> dict:
    s, L = cv.scale, cv.length_mm
    taper = cv.interp([0.0, 0.7, 1.0], [1.0, 0.97, 0.88])
    ax, ay = float(body["ax"]) * taper, float(body["ay"]) * taper
    fat_l, wall = float(body["fat"]), rng.uniform(15, 20) * s
    fat_ap = fat_l * rng.uniform(0.6, 1.0)
    _trunk_wall(cv, ax, ay, fat_l, fat_ap, 0.0)
    cav_x, cav_y = ax - fat_l - wall, ay - fat_ap - wall
    for side in (-1, 1):
        cv.ellipse("muscle", side * 0.4 * ax, -(ay - fat_ap - 8 * s), 45 * s, 14 * s, side * 0.2)
        cv.bone(side * 0.55 * cav_x, 0.84 * cav_y + 0.6 * wall, 38 * s, cv.thick(4.0, 2.6),
                -side * 0.5, cv.span(0.45, 9))  # scapula
    lung_base = rng.uniform(0.05, 0.12)
    cv.ellipse("fat", 0.0, 0.0, cav_x, cav_y)
    cv.ellipse("lung", 0.0, 0.0, cav_x, cav_y, weight=cv.span(lung_base, 9))
    for _ in range(int(rng.integers(6, 11))):  # pulmonary vessels
        side = rng.choice([-1, 1])
        cx0, cy0 = side * rng.uniform(0.35, 0.75) * cav_x, rng.uniform(-0.5, 0.5) * cav_y
        dx, dy = rng.uniform(-0.2, 0.2, size=2)
        r = max(2.5 * s, 1.2 * cv.pixel)
        cv.ellipse("blood", cx0 + dx * cav_x * (cv.t - 0.5), cy0 + dy * cav_y * (cv.t - 0.5), r, r,
                   weight=cv.span(lung_base + 0.1, 0.95))
    cv.blob("liver", -0.3 * cav_x, 0.05 * cav_y, 0.75 * cav_x, 0.9 * cav_y, -0.2, 0.2 + lung_base + 0.2)
    cv.blob("spleen", 0.45 * cav_x, 0.2 * cav_y, 0.5 * cav_x, 0.7 * cav_y, -0.25, 0.35)
    vy, hx, hy = float(body["ay"]) - fat_ap - 62 * s, 16 * s, 14 * s
    mid_y = float(cav_y.mean())  # mediastinal positions do not follow the taper
    cv.ellipse("fat", 0.05 * cav_x, -0.15 * cav_y, 0.25 * cav_x, 0.85 * cav_y, weight=cv.span(lung_base, 9))
    heart = (0.15 * cav_x, -0.3 * cav_y, 0.45 * cav_x, 0.45 * cav_y, 0.3, 0.3, 0.5)
    cv.blob("fat", *heart[:2], heart[2] + 6 * s, heart[3] + 6 * s, *heart[4:])  # pericardial fat
    cv.blob("muscle", *heart)
    cv.blob("blood", *heart, inset=cv.thick(9.0))
    aorta = max(12 * s, 3 * cv.pixel)
    desc = (hx + 8 * s, vy - 0.3 * hy)
    asc = (-5 * s, -0.25 * mid_y)
    cv.ellipse("blood", *desc, aorta, aorta, weight=cv.span(-9, 0.9))
    cv.ellipse("blood", *asc, 1.2 * aorta, 1.2 * aorta, weight=cv.span(0.5, 0.9))
    mid, delta = np.add(asc, desc) / 2, np.subtract(desc, asc)
    cv.blob("blood", *mid, np.hypot(*delta) / 2 + aorta, aorta, 0.9, 20 * s / L, np.arctan2(delta[1], delta[0]))
    cv.ellipse("blood", 18 * s, -0.35 * cav_y, 13 * s, 13 * s, weight=cv.span(0.55, 0.75))  # pulmonary trunk
    cv.ellipse("blood", -22 * s, -0.2 * cav_y, 10 * s, 10 * s, weight=cv.span(0.5, 9))  # SVC
    ty, tr, ring = vy - hy - 18 * s, max(9 * s, 3 * cv.pixel), cv.thick(2.0, 1.0)
    cv.ellipse("soft_tissue", 5 * s, ty + tr + 9 * s, 8 * s, 6 * s)  # oesophagus
    bronchus_x = cv.interp([0.45, 0.62], [0.3 * float(cav_x.mean()), 0.0])
    bronchus_r, bronchus_w = max(6 * s, 2.2 * cv.pixel), cv.span(0.45, 0.62)
    for cx, r, w in ((0.0, tr, cv.span(0.6, 9)), (bronchus_x, bronchus_r, bronchus_w),
                     (-bronchus_x, bronchus_r, bronchus_w)):
        cv.ellipse("cartilage", cx, ty, r + ring, r + ring, weight=w)  # trachea and main bronchi
        cv.ellipse("air", cx, ty, r, r, weight=w)
    for side in (-1, 1):
        cv.ellipse("muscle", side * 28 * s, vy + 45 * s, 22 * s, 20 * s)  # paraspinal
    pitch = 25 * s
    spine(cv, vy, hx, hy, pitch, 5 * s, phase=rng.uniform(0, pitch))
    ribs(cv, cav_x + 0.5 * wall, cav_y + 0.5 * wall, 1.0, rng)
    cv.bone(0.0, -(cav_y + 0.45 * wall), 15 * s, cv.thick(6.0, 3.0), weight=cv.span(0.08, 0.95))  # sternum
    device = cv.thick(4.0)  # pacemaker in the left pectoral fat, below the skin
    edge = float(body["ay"]) * np.interp(0.75, [0.0, 0.7, 1.0], [1.0, 0.97, 0.88]) * np.sqrt(1 - 0.45**2)
    return {"cx": 0.45 * float(body["ax"]), "cy": -(edge - max(0.5 * fat_ap, device + 3 * s)), "rx": 20 * s,
            "ry": device, "angle": 0.0, "tc": 0.75, "half_mm": 20 * s}


def _head_neck(cv: Canvas, body: dict, rng) -> dict:
    s, L, c = cv.scale, cv.length_mm, cv.cortex()
    ax, ay, cy = (cv.interp(_HN_T, body[k]) for k in ("ax", "ay", "cy"))
    cr_x, cr_y, cr_tc, cr_half = 0.89 * float(body["ax"][5]), 0.91 * float(body["ay"][5]), 0.81, 0.23
    f, _ = cv.ellipsoid(cr_tc, cr_half)
    scalp = cv.thick(5.0, 2.0)
    ax = np.where(f > 0, np.maximum(ax, cr_x * f + scalp), ax)
    ay = np.where(f > 0, np.maximum(ay, cr_y * f + scalp), ay)
    cy = np.where(f > 0, 0.0, cy)
    fat = float(body["fat"]) * cv.interp([0.0, 0.3, 0.6, 1.0], [1.4, 1.0, 0.8, 0.7])
    cv.ellipse("soft_tissue", 0.0, cy, ax, ay)
    cv.ellipse("fat", 0.0, cy, ax - 1.5 * s, ay - 1.5 * s)
    cv.ellipse("muscle", 0.0, cy, ax - fat, ay - fat, weight=cv.span(-9, 0.62))
    nose_w = cv.span(0.44, 0.6)
    cv.ellipse("soft_tissue", 0.0, cy - ay + 4 * s, 13 * s, 20 * s, weight=nose_w)
    cv.ellipse("air", 0.0, cy - ay - 4 * s, 8 * s, max(4 * s, MIN_GAS_VOXELS * cv.pixel), weight=nose_w)
    # cranium: outer table, diploe, inner table, CSF, grey and white matter
    table, csf = c, cv.thick(2.5, 1.0)
    layers = (("cortical", 0.0), ("cancellous", table), ("cortical", table + cv.thick(3.0, 1.5)))
    inset = layers[-1][1] + table
    for tissue, d in layers + (("fluid", inset), ("grey_matter", inset + csf),
                               ("white_matter", inset + csf + cv.thick(4.5, 2.0))):
        cv.blob(tissue, 0.0, 0.0, cr_x, cr_y, cr_tc, cr_half, inset=d, inset_z=0.3 * d)  # thin base
    for side in (-1, 1):  # lateral ventricles
        cv.blob("fluid", side * 8 * s, -5 * s, max(5 * s, 2 * cv.pixel), 22 * s, 0.83, 0.06, side * 0.15)
    cv.blob("grey_matter", 0.0, 0.35 * cr_y, 0.55 * cr_x, 0.3 * cr_y, 0.66, 0.06)  # cerebellum
    gas = MIN_GAS_VOXELS * cv.pixel
    fy = -(0.95 * cr_y - table - max(4 * s, gas))  # frontal sinus in thickened frontal bone
    cv.bone(0.0, fy, 16 * s + c, max(4 * s, gas) + c, weight=cv.span(0.71, 0.78))
    cv.ellipse("air", 0.0, fy, 14 * s, max(4 * s, gas), weight=cv.span(0.715, 0.775))
    cv.bone(0.0, -60 * s, max(7 * s, gas) + c, 17 * s + c, weight=cv.span(0.58, 0.68))  # ethmoid
    cv.ellipse("air", 0.0, -60 * s, max(7 * s, gas), 14 * s, weight=cv.span(0.58, 0.68))
    for side in (-1, 1):
        cv.bone(side * 30 * s, -66 * s, 20 * s, 24 * s, weight=cv.span(0.6, 0.73), interior="fat")  # orbit
        cv.blob("fluid", side * 30 * s, -72 * s, 12 * s, 12 * s, 0.665, 12 * s / L)  # globe
        cv.bone(side * 38 * s, 15 * s, 22 * s, cv.thick(9.0, 4.0), side * 0.6, cv.span(0.58, 0.66),
                cortex="cortical")  # petrous
        cv.ellipse("air", side * 44 * s, 20 * s, gas, gas, weight=cv.span(0.59, 0.65))  # mastoid cells
        cv.bone(side * 30 * s, -48 * s, 15 * s + c, 19 * s + c, weight=cv.span(0.45, 0.6))  # maxillary sinus
        cv.ellipse("air", side * 30 * s, -48 * s, 15 * s, 19 * s, weight=cv.span(0.455, 0.595))
        cv.blob("gland", side * 48 * s, 8 * s, 11 * s, 18 * s, 0.44, 0.07)  # parotid
        cv.bone(side * 46 * s, 5 * s, cv.thick(4.0, 2.6), 14 * s, side * 0.2, cv.span(0.33, 0.56))  # ramus
    cv.ellipse("air", 0.0, -45 * s, max(8 * s, gas), 36 * s, weight=cv.span(0.45, 0.58))  # nasal cavity
    cv.ellipse("air", 0.0, -2 * s, 12 * s, max(8 * s, gas), weight=cv.span(0.45, 0.56))  # nasopharynx
    arch = (0.0, -20 * s, 42 * s, 52 * s)
    bone_hw, tooth_hw = cv.thick(6.0, 2.6), cv.thick(4.5, 2.2)
    cv.ellipse("cortical", 0.0, -45 * s, 30 * s, 38 * s, weight=cv.span(0.43, 0.455))  # hard palate
    cv.bone_arc(*arch, bone_hw, 0.0, 0.5 * np.pi, cv.span(0.43, 0.47))  # maxillary alveolus
    cv.arc("teeth", *arch, tooth_hw, 0.0, 0.42 * np.pi, cv.span(0.40, 0.43))
    cv.arc("teeth", *arch, tooth_hw, 0.0, 0.42 * np.pi, cv.span(0.36, 0.395))
    cv.bone_arc(*arch, bone_hw, 0.0, 0.55 * np.pi, cv.span(0.22, 0.36))  # mandible
    air_y = s * cv.interp([0.0, 0.2, 0.3, 0.46], [-22.0, -18.0, 2.0, 5.0])
    air_rx = np.maximum(s * cv.interp([0.0, 0.2, 0.3, 0.46], [12.0, 10.0, 12.0, 10.0]), gas)
    air_ry = np.maximum(s * cv.interp([0.0, 0.2, 0.3, 0.46], [8.0, 9.0, 7.0, 8.0]), gas)
    cv.ellipse("cartilage", 0.0, air_y, air_rx + c, air_ry + c, weight=cv.span(-9, 0.22))  # larynx
    cv.ellipse("air", 0.0, air_y, air_rx, air_ry, weight=cv.span(-9, 0.46))
    for side in (-1, 1):
        r = max(3.5 * s, 1.5 * cv.pixel)
        cv.ellipse("blood", side * 22 * s, s * cv.interp([0.0, 0.45], [-8.0, 5.0]), r, r, weight=cv.span(-9, 0.5))
        cv.ellipse("blood", side * 31 * s, 2 * s, 1.5 * r, 1.5 * r, weight=cv.span(-9, 0.5))  # jugular
    pitch = 17 * s
    spine(cv, s * cv.interp([0.0, 0.5], [30.0, 26.0]), 11 * s, 8 * s, pitch, 4.5 * s,
          weight=cv.span(-9, 0.52), phase=rng.uniform(0, pitch))
    theta = rng.uniform(0.1, 0.4) * np.pi * rng.choice([-1, 1])  # dental filling / crown
    return {"cx": arch[2] * np.sin(theta), "cy": arch[1] - arch[3] * np.cos(theta), "rx": cv.thick(3.5),
            "ry": cv.thick(3.5), "angle": 0.0, "tc": 0.4, "half_mm": 4.0}
