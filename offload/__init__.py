"""Pinned host memory, weight streaming with a prefetch stream, and KV offload. Never imports triforce_rt.

Empty until the GPU-path issue (#6) lands its mechanisms; nothing here is used yet.
"""
