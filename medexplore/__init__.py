"""medexplore: multitask multimodal medical-image learning with one transformer for 2D and 3D.

Subpackages: ``models`` (Medformer), ``ssl`` (VICReg), ``data``, ``train``, ``analysis``, ``viz``;
``medexplore.cli`` is the command line. Nothing here imports Qt or napari.
"""
__version__ = "0.1.0"
