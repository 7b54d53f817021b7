"""The three phantom regions (abdomen, thorax, head and neck): body outlines and the organs,
bones and gas drawn into a :class:`~latent.core.phantom.anatomy.Canvas` (mm, LPS, see there)."""

from __future__ import annotations

import numpy as np

from latent.core.phantom.anatomy import MIN_GAS_VOXELS, REGIONS, Canvas, ribs, spine


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
