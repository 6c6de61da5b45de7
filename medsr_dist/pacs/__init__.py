"""PACS access for the nightly job: DICOMweb (QIDO-RS / WADO-RS / STOW-RS) through ``dicomweb-client``.

See :mod:`medsr_dist.pacs.dicomweb`.
"""
