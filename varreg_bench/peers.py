"""The peer libraries as benchmark runners, each returning a varreg displacement.

Every runner is ``runner(fixed, moving, spacing=None, device="cpu", **params) -> u``
with ``u`` of shape ``(ndim, *fixed.shape)`` float32, in voxels of the fixed
grid, pull-back (``moving(x + u(x)) ~ fixed(x)``), whatever the library's own
convention. The libraries are imported when a runner is called.
"""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np

__all__ = ["SKIMAGE_PARAMS", "DEMONS_PARAMS", "ANTS_PARAMS", "ELASTIX_PARAMS", "PEERS", "skimage_tvl1", "sitk_demons",
           "ants_syn", "elastix_ffd"]

#: Parameters of the peers, checked with ``varreg bench --tune`` on ACDC *train* patients (docs/bench.md):
#: skimage: its defaults (as benchmarks/acdc_2d.py; the grid's best was 0.002 Dice higher, within noise).
#: SimpleITK demons: std 1.0 was best; 50/30/20 iterations (100/50/25: +0.0015 Dice for 1.4x the time).
#: ANTsPy SyN (tuned in a separate environment with antspyx 0.6.3): the grid spanned 0.001 Dice; the fastest kept.
SKIMAGE_PARAMS = {}
DEMONS_PARAMS = dict(iterations=(50, 30, 20), shrink=(4, 2, 1), std=1.0, histogram_matching=True)
#: elastix B-spline FFD: elastix's default "bspline" map (3 resolutions, Mattes mutual information with a
#: bending-energy penalty, adaptive stochastic gradient descent); grid spacing and iterations from --tune
ELASTIX_PARAMS = dict(grid_spacing=8.0, iterations=256, metric="AdvancedMattesMutualInformation", resolutions=3)
ANTS_PARAMS = dict(syn_metric="CC", syn_sampling=2, flow_sigma=3.0, total_sigma=0.0, grad_step=0.2,
                   reg_iterations=(40, 20, 10))


def skimage_tvl1(fixed, moving, spacing=None, device="cpu", **params):
    """scikit-image ``optical_flow_tvl1(fixed, moving)``: already (ndim, *shape), voxels, pull-back."""
    from skimage.registration import optical_flow_tvl1

    return optical_flow_tvl1(fixed, moving, **params).astype(np.float32)


def _sitk_image(a, spacing):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))  # x = last array axis
    img.SetSpacing([float(s) for s in reversed(spacing)])
    return img


def _sitk_shrink(img, factors):
    """Gaussian smoothing (sigma 0.5 sqrt(f^2 - 1) voxels) and resampling to size / f, corners aligned."""
    import SimpleITK as sitk

    sp = img.GetSpacing()
    sig = [0.5 * math.sqrt(f * f - 1.0) * s if f > 1 else 0.0 for f, s in zip(factors, sp)]
    sm = sitk.SmoothingRecursiveGaussian(img, [max(x, 1e-6 * s) for x, s in zip(sig, sp)])
    size = [max(int(n / f + 0.5), 2) for f, n in zip(factors, img.GetSize())]
    spacing = [(n - 1) * s / (m - 1) for n, s, m in zip(img.GetSize(), sp, size)]
    return sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                         img.GetDirection(), 0.0, img.GetPixelID())


def sitk_demons(fixed, moving, spacing=None, device="cpu", *, iterations=(50, 30, 20), shrink=(4, 2, 1), std=1.0,
                histogram_matching=True, symmetric=False):
    """SimpleITK diffeomorphic demons in a coarse-to-fine scheme, as a varreg displacement.

    The moving image is histogram-matched to the fixed one (1024 levels, 7
    match points, threshold at the mean). Level ``k`` shrinks every axis of at
    least 32 voxels by ``shrink[k]`` (thin axes, such as the few slices of a
    short-axis stack, are kept), runs ``iterations[k]`` demons iterations with
    the displacement field smoothed by a Gaussian of ``std`` voxels, and passes
    its field (resampled linearly) to the next level. ``symmetric`` uses the
    fast symmetric forces filter instead.

    SimpleITK's field is physical, in its (x, y[, z]) order, where
    ``GetImageFromArray`` makes x the *last* array axis: component ``i`` of the
    returned displacement is ``field[..., ndim - 1 - i] / spacing[i]``.
    """
    import SimpleITK as sitk

    nd = fixed.ndim
    sp = tuple(float(s) for s in (spacing or (1.0,) * nd))
    f = _sitk_image(fixed, sp)
    m = _sitk_image(moving, sp)
    if histogram_matching:
        m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=1024, numberOfMatchPoints=7,
                                   thresholdAtMeanIntensity=True)
    flt = sitk.FastSymmetricForcesDemonsRegistrationFilter() if symmetric else sitk.DiffeomorphicDemonsRegistrationFilter()
    flt.SetStandardDeviations(float(std))
    flt.SetSmoothDisplacementField(True)
    field = None
    for its, s in zip(iterations, shrink):
        factors = [s if n >= 32 else 1 for n in f.GetSize()]
        fl, ml = (f, m) if max(factors) == 1 else (_sitk_shrink(f, factors), _sitk_shrink(m, factors))
        if field is None:
            field = sitk.Image(fl.GetSize(), sitk.sitkVectorFloat64)
            field.CopyInformation(fl)
        else:
            field = sitk.Resample(field, fl)  # physical vectors: no rescaling between levels
        flt.SetNumberOfIterations(int(its))
        field = flt.Execute(fl, ml, field)
    d = sitk.GetArrayViewFromImage(field)  # (*shape, nd), components (x, y[, z])
    return np.stack([d[..., nd - 1 - i] / sp[i] for i in range(nd)]).astype(np.float32)


def ants_syn(fixed, moving, spacing=None, device="cpu", **params):
    """ANTsPy SyN (``type_of_transform="SyNOnly"``, no affine stage), as a varreg displacement.

    The forward transforms are composed into one displacement field
    (``apply_transforms(..., compose=)``); ANTsPy keeps the array axis order
    (axis ``i`` of the array is ITK axis ``i``), so component ``i`` is
    ``field[..., i] / spacing[i]`` (checked on shifted images in
    tests/test_bench.py, which skips without antspyx).
    """
    import ants

    nd = fixed.ndim
    sp = tuple(float(s) for s in (spacing or (1.0,) * nd))
    f = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=sp)
    m = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=sp)
    with tempfile.TemporaryDirectory(prefix="varreg-ants-") as tmp:
        reg = ants.registration(f, m, type_of_transform="SyNOnly", outprefix=os.path.join(tmp, "r"), **params)
        path = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=os.path.join(tmp, "c"))
        d = ants.image_read(path).numpy()  # (*shape, nd)
    if d.shape != (*fixed.shape, nd):
        raise RuntimeError(f"ANTs composed field has shape {d.shape}; expected {(*fixed.shape, nd)}")
    return np.stack([d[..., i] / sp[i] for i in range(nd)]).astype(np.float32)


def elastix_ffd(fixed, moving, spacing=None, device="cpu", *, grid_spacing=8.0, iterations=256,
                metric="AdvancedMattesMutualInformation", resolutions=3, threads=None):
    """elastix B-spline free-form deformation (itk-elastix), as a varreg displacement.

    elastix's default ``bspline`` parameter map (Klein et al., IEEE TMI 29(1), 2010) with the final
    control-point spacing ``grid_spacing`` (mm, the spacing's units), ``iterations`` per resolution,
    ``metric`` (with the bending-energy penalty of the default map) and ``resolutions`` pyramid
    levels. transformix gives the field in physical units, in ITK's (x, y[, z]) order where x is
    the last array axis: component ``i`` is ``field[..., ndim - 1 - i] / spacing[i]`` (as demons).
    """
    import itk

    nd = fixed.ndim
    sp = tuple(float(s) for s in (spacing or (1.0,) * nd))
    images = []
    for a in (fixed, moving):
        img = itk.image_view_from_array(np.ascontiguousarray(a, dtype=np.float32))
        img.SetSpacing([float(s) for s in reversed(sp)])
        images.append(img)
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("bspline", int(resolutions), float(grid_spacing))
    pm["MaximumNumberOfIterations"] = [str(int(iterations))]
    pm["Metric"] = [metric, "TransformBendingEnergyPenalty"]
    pm["WriteResultImage"] = ["false"]
    po.AddParameterMap(pm)
    kw = {} if threads is None else {"number_of_threads": int(threads)}
    with tempfile.TemporaryDirectory(prefix="varreg-elastix-") as tmp:  # transformix writes its field file there
        _, tp = itk.elastix_registration_method(images[0], images[1], parameter_object=po, log_to_console=False,
                                                output_directory=tmp, **kw)
        d = itk.array_from_image(itk.transformix_deformation_field(images[1], tp, output_directory=tmp))  # (*shape, nd)
    if d.shape != (*fixed.shape, nd):
        raise RuntimeError(f"elastix field has shape {d.shape}; expected {(*fixed.shape, nd)}")
    return np.stack([d[..., nd - 1 - i] / sp[i] for i in range(nd)]).astype(np.float32)


PEERS = {
    # name: (module to import, label, runner, params, config text)
    "skimage-tvl1": ("skimage", "scikit-image optical_flow_tvl1 (default)", skimage_tvl1, SKIMAGE_PARAMS,
                     "skimage.registration.optical_flow_tvl1 with its defaults (attachment 15, tightness 0.3, "
                     "5 warps x 10 iterations, its own pyramid); no spacing (voxels treated as cubes); defaults "
                     "kept, as benchmarks/acdc_2d.py: on 3 train patients (--tune) the grid's best was 0.002 Dice "
                     "higher"),
    "sitk-demons": ("SimpleITK", "SimpleITK diffeomorphic demons", sitk_demons, DEMONS_PARAMS,
                    "DiffeomorphicDemonsRegistrationFilter, histogram matching, 3 levels (shrink 4, 2, 1 on axes of "
                    ">= 32 voxels), 50/30/20 iterations, field smoothing std 1.0 voxel; iterations and std chosen "
                    "with varreg bench --tune on 3 ACDC train patients; uses the spacing"),
    "elastix-ffd": ("itk.ElastixPython", "elastix B-spline FFD", elastix_ffd, ELASTIX_PARAMS,
                    "itk-elastix, elastix's default bspline map: 3 resolutions, Mattes MI + bending energy, "
                    "adaptive stochastic gradient descent; final grid spacing and iterations from varreg bench "
                    "--tune on ACDC train patients (docs/bench.md); uses the spacing"),
    "ants-syn": ("ants", "ANTsPy SyN", ants_syn, ANTS_PARAMS,
                 "ants.registration SyNOnly, CC radius 2, flow sigma 3, total sigma 0, gradient step 0.2, "
                 "40/20/10 iterations; uses the spacing; flow sigma and iterations checked with --tune on 2 ACDC "
                 "train patients (spread 0.001 Dice; the fastest kept)"),
}
