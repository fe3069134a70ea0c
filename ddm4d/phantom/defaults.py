"""Labels, tissue classes, option limits and every anatomical and acquisition default of the phantom."""
from __future__ import annotations

from dataclasses import dataclass, field


LABEL_BACKGROUND, LABEL_RV, LABEL_MYOCARDIUM, LABEL_LV = 0, 1, 2, 3
LABEL_NAMES = {LABEL_RV: "RV cavity", LABEL_MYOCARDIUM: "LV myocardium", LABEL_LV: "LV cavity"}
# static (non-cardiac) tissue classes of PhantomSubject.tissues, for masks in tests and analyses
TISSUES = ("air", "fat", "muscle", "mediastinum", "lung", "liver", "bone", "aorta")
# what make_subject accepts
FRAME_LIMITS = (2, 200)  # frames per cycle
IN_PLANE_LIMITS = (16, 1024)  # voxels along x and y
SLICE_LIMITS = (1, 1024)  # voxels along z (1: a single short-axis slice)
EJECTION_FRACTION_LIMITS = (0.05, 0.9)
MAX_PATIENTS = 999  # ACDC names folders patient001 .. patient999
#: phantom.json's "format": a patient folder holding it was written by ddm4d phantom, which may rewrite it
PHANTOM_FORMAT = "ddm4d-phantom"


@dataclass(frozen=True)
class Intensities:
    """bSSFP-like signal per tissue (arbitrary units, blood ~900): blood and fat bright, lungs dark."""

    air: float = 0.0
    fat: float = 640.0
    muscle: float = 210.0
    mediastinum: float = 360.0
    lung: float = 40.0
    liver: float = 330.0
    bone_marrow: float = 470.0
    bone_cortex: float = 110.0
    aorta: float = 820.0
    lv_blood: float = 900.0
    rv_blood: float = 840.0
    myocardium: float = 230.0
    epicardial_fat: float = 600.0


@dataclass(frozen=True)
class PhantomDefaults:
    """Every anatomical and acquisition default of the phantom; pairs are (low, high) ranges a subject
    draws from uniformly. Lengths in mm, angles in degrees, fractions of the field of view (FOV) as
    noted. Grouped here so a variation of the phantom is one `dataclasses.replace` away."""

    # acquisition (ACDC-like geometry)
    in_plane_size: tuple[int, int] = (128, 160)
    in_plane_spacing_mm: tuple[float, float] = (1.3, 1.7)
    field_of_view_mm: tuple[float, float] = (200.0, 250.0)
    slices: tuple[int, int] = (8, 12)
    slice_thickness_mm: tuple[float, float] = (5.0, 10.0)
    stack_margin_mm: float = 5.0  # stack reaches this far beyond apex and base
    direction_rotation_deg: tuple[float, float] = (3.0, 15.0)  # image direction vs identity
    origin_extent_mm: float = 150.0  # origin components drawn in [-extent, extent]
    # cardiac cycle
    frames: tuple[int, int] = (12, 25)
    end_systole_phase: tuple[float, float] = (0.35, 0.45)  # fraction of the cycle
    early_filling_share: float = 0.75  # of the refill done in rapid filling; the rest is atrial kick
    early_filling_phase: float = 0.4  # fraction of diastole that rapid filling lasts
    atrial_kick_phase: float = 0.75  # fraction of diastole where the atrial kick starts
    # left ventricle at ED
    ejection_fraction: tuple[float, float] = (0.30, 0.70)
    lv_cavity_radius_mm: tuple[float, float] = (18.0, 23.0)
    lv_ellipticity: tuple[float, float] = (0.8, 1.0)  # minor / major short-axis radius
    lv_cavity_length_mm: tuple[float, float] = (50.0, 64.0)  # cavity apex to base-plane centre
    lv_wall_mm: tuple[float, float] = (6.5, 9.5)
    apex_wall_ratio: float = 0.8  # apical wall thickness / lateral wall thickness
    long_axis_shortening_per_ef: float = 0.35  # cavity length shortening at ES = this * EF
    base_plane_tilt_deg: tuple[float, float] = (12.0, 22.0)  # mitral plane vs short-axis plane
    long_axis_tilt_deg: tuple[float, float] = (0.0, 6.0)  # LV long axis vs slice normal
    twist_apex_deg: tuple[float, float] = (6.0, 10.0)  # apex and base rotate in opposite senses
    twist_base_deg: tuple[float, float] = (2.0, 5.0)
    papillary_radius_mm: tuple[float, float] = (3.0, 4.5)
    papillary_angles_deg: tuple[float, float] = (140.0, -115.0)  # from the RV direction
    papillary_inset: float = 0.6  # column centre inside the endocardium, in column radii
    papillary_level: float = 0.55  # column centre below the base centre, in cavity lengths
    papillary_half_length: float = 0.3  # in cavity lengths
    lv_offset_fov: tuple[tuple[float, float], tuple[float, float]] = ((0.03, 0.08), (-0.09, -0.04))
    # right ventricle
    rv_direction_deg: tuple[float, float] = (185.0, 215.0)  # LV to RV in the image (x right, y down)
    rv_depth_ratio: tuple[float, float] = (0.95, 1.1)  # RV radial semi-axis / LV epicardial radius
    rv_offset_ratio: tuple[float, float] = (0.6, 0.7)  # RV centre distance / RV radial semi-axis
    rv_width_ratio: tuple[float, float] = (1.3, 1.5)  # RV tangential / radial semi-axis
    rv_length_ratio: tuple[float, float] = (0.75, 0.9)  # RV long semi-axis / LV epicardial length
    rv_ef_ratio: tuple[float, float] = (0.8, 1.0)  # RV in-plane contraction relative to the LV's
    rv_wall_mm: float = 3.0
    atrium_radius_ratio: tuple[float, float] = (0.7, 0.85)  # of the LV epicardial radius
    # atrial centres in the heart frame (x towards the RV, y posterior), in LV epicardial radii;
    # they sit above the base plane by `atrium_rise` of their radius, the RA `ra_size` of the LA
    la_offset: tuple[float, float] = (-0.15, 0.35)
    ra_offset: tuple[float, float] = (0.55, 0.45)
    atrium_rise: float = 0.3
    ra_size: float = 0.85
    epicardial_fat_mm: tuple[float, float] = (2.0, 4.5)
    # body (fractions of the FOV: the operator fits the FOV to the chest)
    body_half_width_fov: tuple[float, float] = (0.44, 0.48)
    body_half_height_fov: tuple[float, float] = (0.36, 0.40)
    body_shift_fov: tuple[float, float] = (0.0, 0.04)  # body centre below the FOV centre
    subcutaneous_fat_mm: tuple[float, float] = (4.0, 12.0)  # drawn separately laterally and front-back
    chest_wall_muscle_mm: tuple[float, float] = (8.0, 14.0)
    lung_half_width_ratio: tuple[float, float] = (0.33, 0.40)  # of the body half width
    lung_half_height_ratio: tuple[float, float] = (0.68, 0.78)  # of the body half height
    lung_overlap: float = 0.15  # share of a lung's width tucked under the chest wall (cut off)
    lung_drop: float = 0.1  # lung centres below the body centre, in body half heights
    mediastinum_margin_mm: float = 3.0  # tissue between the heart and the lungs
    vertebra_radius_mm: tuple[float, float] = (12.0, 16.0)
    vertebra_shift_mm: float = 8.0  # off the midline, either side
    vertebra_depth: float = 1.8  # centre in front of the back muscles, in vertebra radii
    vertebra_cortex_mm: float = 2.0
    paraspinal_radii: tuple[float, float] = (2.6, 1.8)  # back muscles, in vertebra radii
    paraspinal_drop: float = 0.8  # their centre behind the vertebra's, in vertebra radii
    posterior_mediastinum: tuple[float, float, float, float] = (1.0, -1.0, 2.4, 1.2)  # x, y, rx, ry
    aorta_radius_mm: tuple[float, float] = (9.0, 12.0)
    aorta_gap: float = 1.2  # aorta centre beside the vertebra, in aorta radii past its edge
    aorta_rise: float = 0.6  # in front of the vertebra centre, in vertebra radii
    liver_radii_mm: tuple[float, float, float] = (70.0, 55.0, 60.0)
    liver_offset: tuple[float, float] = (-0.6, 0.4)  # from the LV centre, in liver radii
    liver_dome_above_apex_mm: tuple[float, float] = (5.0, 25.0)
    # image formation
    intensities: Intensities = field(default_factory=Intensities)
    intensity_jitter: float = 0.1  # each tissue's signal varies by +- this fraction per subject
    coil_shading: float = 0.35  # depth of the multiplicative coil sensitivity
    coil_width_fov: float = 0.6  # coil sensitivity fall-off (Gaussian sigma), in FOV widths
    coil_distance: float = 1.1  # coils front and back, in body half heights from its centre
    coil_z_weight: float = 0.5  # sensitivity falls off more slowly along the slice axis
    noise: float = 0.035  # Rician noise sigma as a fraction of the LV blood signal
    height_cm: tuple[float, float] = (155.0, 192.0)
    weight_kg: tuple[float, float] = (52.0, 98.0)


DEFAULTS = PhantomDefaults()
