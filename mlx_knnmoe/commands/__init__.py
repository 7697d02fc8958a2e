"""The console scripts: thin click commands over the subpackages (main.py dispatches)."""
