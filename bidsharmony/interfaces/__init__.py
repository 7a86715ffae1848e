"""Nipype interfaces: each wraps one core function, files in, files out."""
