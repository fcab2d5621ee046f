"""Glue between the pure-tensor core and nnU-Net v2."""
