"""napari-medexplore: medexplore's readers, sample data and widgets for napari."""
__version__ = "0.1.0"
