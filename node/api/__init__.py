"""The HTTP service: REST API under /api/v1, STOW-RS under /dicom-web, health probes."""
