"""ComfyUI entry point: ComfyUI imports this folder (custom_nodes/<name>) as a package and reads the mappings.

The nodes live in `turbowan.comfy_nodes`; the import is relative because ComfyUI names the package after
the folder. Optional GPU libraries (Triton, SpargeAttn) are imported only when a run needs them, so the
nodes register on any machine.
"""

try:
    import folder_paths  # noqa: F401  provided by ComfyUI only
except ImportError:  # imported outside ComfyUI (e.g. pytest collecting the checkout): nothing to register
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .turbowan.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
