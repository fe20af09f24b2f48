"""Multi-view 3D reconstruction (nvdiffrec-style): rendering, DMTet geometry, materials and export."""
