"""nnU-Net trainers of the workbench, found by nnU-Net through ``nnUNet_extTrainer=<this folder>``.

nnU-Net imports the modules of this folder by file (not as part of the ``workbench``
package), so they import nothing from the workbench.
"""
