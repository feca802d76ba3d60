"""napari-medexplore: medexplore's readers, sample data and widgets for napari."""
from ._llvm import isolate_triton_from_mesa

__version__ = "0.1.0"

# napari imports this package when a contribution is first used, usually after its canvas exists;
# torch's compiler stack pulls in triton later, whose LLVM must not bind to Mesa's (see _llvm).
isolate_triton_from_mesa()
