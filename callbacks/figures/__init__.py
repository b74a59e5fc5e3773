"""Pure figure functions of the report callbacks: NumPy arrays and labels in, matplotlib figures
(or a GIF file) out; no Lightning object, no W&B."""
