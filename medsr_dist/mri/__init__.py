"""3-D MRI: anisotropic (thick-slice) volumes reconstructed to isotropic by cross-plane self-similarity.

The flow mirrors the 2-D one: :mod:`.volume` (NIfTI / DICOM series in and out, keeping the affine) ->
:mod:`.simulate` (anisotropic inputs and slice pairs from a volume) -> :mod:`.prepare` (slice pairs as sharded
Parquet on the store, Ray Data) -> :mod:`.reconstruct` (every through-plane slice through the one inference
engine, restacked and fused) -> :mod:`.metrics` (3-D PSNR/SSIM inside a foreground mask, interpolation baselines).

Axis convention everywhere: ``Volume.data[i, j, k]`` is indexed like the NIfTI voxel grid, and ``Volume.affine``
maps ``(i, j, k, 1)`` to RAS+ millimetres (nibabel's convention; DICOM's LPS is converted on reading).
"""
