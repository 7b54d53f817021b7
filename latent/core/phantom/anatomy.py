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


