"""Test double of the `comfy` package of ComfyUI 0.3.54: only the modules the TurboWan nodes touch."""
