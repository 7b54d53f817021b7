"""Acquisition effects of the phantom (smooth noise, the MR bias field) and its optional
artefacts: a metal implant (CT streaks, MR signal void), a small rigid misregistration of the
CT against the MR and a smooth deformable one."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from latent.core.phantom.anatomy import Canvas


# -- options: metal and misregistration ------------------------------------------------------------
def _add_metal(cv: Canvas, site: dict, rng, info: dict):
    """Paint the metal object; return the (wider) MR signal void as ``(occupancy, box)``."""
    lo, hi = cv.t[0], cv.t[-1]
    tc = float(np.clip(site["tc"], lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo)))
    half = max(site["half_mm"], 0.6 * cv.slice_mm) / cv.length_mm
    cv.blob("metal", site["cx"], site["cy"], site["rx"], site["ry"], tc, half, site["angle"])
    widen = rng.uniform(1.8, 2.5)
    factor, weight = cv.ellipsoid(tc, half * 1.8)
    pad = 3 * cv.pixel
    void = cv.occupancy(site["cx"], site["cy"], (site["rx"] * widen + pad) * factor,
                        (site["ry"] * widen + pad) * factor, site["angle"], weight)
    site["tc_used"], site["half_t"] = tc, half
    info["metal"] = {k: float(v) for k, v in site.items()}
    return None if void[0] is None else void


def _metal_streaks(cv: Canvas, site: dict, rng) -> np.ndarray:
    """Bright and dark rays from the metal on the slices it occupies (decaying with distance)."""
    _, weight = cv.ellipsoid(site["tc_used"], site["half_t"])
    weight = np.convolve(weight, [0.3, 1.0, 0.3], mode="same").clip(0, 1)
    dx = cv.x[None, :] - site["cx"]
    dy = cv.y[:, None] - site["cy"]
    theta, radius = np.arctan2(dy, dx), np.hypot(dx, dy)
    rays = np.zeros_like(radius)
    for angle, amplitude, width in zip(rng.uniform(-np.pi, np.pi, 16), rng.uniform(-700, 500, 16),
                                       rng.uniform(0.01, 0.03, 16)):
        rays += amplitude * np.exp(-0.5 * (np.angle(np.exp(1j * (theta - angle))) / width) ** 2)
    rays *= 20.0 / (radius + 20.0)  # decays over a few cm
    return (weight[:, None, None] * rays[None]).astype(np.float32)


def _misregister(ct: np.ndarray, spacing_zyx, rng, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small rigid motion of the CT against the MR (rotation about z and x, translation).

    Returns the moved CT and the voxel map ``(matrix, offset)``: moved[p] = ct[matrix @ p + offset]."""
    yaw, pitch = np.deg2rad(rng.uniform(-2.0, 2.0)), np.deg2rad(rng.uniform(-1.0, 1.0))
    shift_mm = rng.uniform(-2.0, 2.0, size=3) * [0.75, 1.0, 1.0]  # (z, y, x)
    rz = np.array([[1, 0, 0], [0, np.cos(yaw), -np.sin(yaw)], [0, np.sin(yaw), np.cos(yaw)]])
    rx = np.array([[np.cos(pitch), -np.sin(pitch), 0], [np.sin(pitch), np.cos(pitch), 0], [0, 0, 1]])
    scale = np.diag(spacing_zyx)
    matrix = np.linalg.inv(scale) @ rz @ rx @ scale
    centre = (np.array(ct.shape) - 1) / 2
    offset = centre - matrix @ centre + shift_mm / np.asarray(spacing_zyx)
    info["misregistration"] = {"yaw_deg": float(np.rad2deg(yaw)), "pitch_deg": float(np.rad2deg(pitch)),
                               "shift_mm_zyx": [float(v) for v in shift_mm]}
    moved = ndimage.affine_transform(ct, matrix, offset, order=1, mode="nearest")
    return moved, matrix, offset


def _deform(ct: np.ndarray, spacing_zyx, rng, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random deformation of the CT against the MR: a displacement field interpolated
    (cubic) from a coarse 4 x 5 x 5 grid of Gaussian vectors, scaled so its largest in-body
    length is ``amplitude_mm`` (2-4 mm; half along z, whose slices are thick).

    Returns the deformed CT and the field in voxels: deformed[p] = ct[p + field[:, p]]."""
    amplitude = float(rng.uniform(2.0, 4.0))
    coarse = rng.standard_normal((3, 4, 5, 5))
    field_mm = np.stack([ndimage.zoom(c, np.array(ct.shape) / c.shape, order=3, mode="nearest") for c in coarse])
    field_mm[0] *= 0.5
    field_mm *= amplitude / max(float(np.linalg.norm(field_mm, axis=0).max()), 1e-6)
    grid = np.indices(ct.shape, dtype=np.float32)
    spacing = np.asarray(spacing_zyx, dtype=np.float32)[:, None, None, None]
    info["deformation"] = {"amplitude_mm": amplitude, "control_grid_zyx": [4, 5, 5],
                           "mean_mm": float(np.linalg.norm(field_mm, axis=0).mean())}
    field = field_mm / spacing
    return ndimage.map_coordinates(ct, grid + field, order=1, mode="nearest"), field


def move_ct(ct: np.ndarray, spacing_zyx, rng, misregistration: bool, deformation: bool,
            info: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The CT moved against the MR: rigidly (``misregistration``), then smoothly deformed
    (``deformation``, from its own stream spawned off ``rng``, so the rigid draw is unchanged).

    Returns the moved CT and the true motion (None when nothing moved): a (3, z, y, x) field in mm
    (z, y, x components) such that the moved CT at voxel p is the unmoved CT at p + motion[:, p] / spacing.
    Reads beyond the volume take its nearest voxel: the anatomy goes on past the end slices of a scan
    (in-plane the canvas ends in air anyway); air there would be a defect of its own, which real
    misregistration never shows.
    """
    deform_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]) if deformation else None
    if not (misregistration or deformation):
        return ct, None
    grid = np.indices(ct.shape, dtype=np.float32)
    reading = grid
    if misregistration:
        ct, matrix, offset = _misregister(ct, spacing_zyx, rng, info)
    if deform_rng is not None:
        ct, field = _deform(ct, spacing_zyx, deform_rng, info)
        ct, reading = ct.astype(np.float32), grid + field
    if misregistration:
        reading = (np.einsum("ij,j...->i...", matrix.astype(np.float32), reading)
                   + offset.astype(np.float32)[:, None, None, None])
    spacing = np.asarray(spacing_zyx, dtype=np.float32)[:, None, None, None]
    return ct, ((reading - grid) * spacing).astype(np.float32)


def _unit_noise(rng, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=2.5)
    return noise / max(float(noise.std()), 1e-6)


def _bias_field(shape, amplitude: float, rng) -> np.ndarray:
    """Smooth multiplicative field 1 +- amplitude: random polynomial of degree 2 over the grid."""
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    legendre = [lambda u: np.ones_like(u), lambda u: u, lambda u: 1.5 * u**2 - 0.5]
    field_ = np.zeros(shape, np.float32)
    for k in range(3):  # z order k times an in-plane polynomial of order <= 2 - k
        plane = sum(rng.uniform(-1, 1) * legendre[i](y)[:, None] * legendre[j](x)[None, :]
                    for i in range(3) for j in range(3) if 0 < i + j + k <= 2)
        field_ += (0.5 if k else 1.0) * legendre[k](z)[:, None, None] * plane[None]  # slower along z
    return 1 + amplitude * field_ / max(float(np.abs(field_).max()), 1e-6)
