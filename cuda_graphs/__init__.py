"""Capture and replay of fixed-shape decoding steps; eager where there is no CUDA. Never imports triforce_rt.

Empty until the GPU-path issue (#6) lands its mechanisms; nothing here is used yet.
"""
