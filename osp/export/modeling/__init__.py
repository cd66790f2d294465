"""Modeling code copied verbatim into custom-code export folders (standalone: it never imports osp).

A package here so that it is installed with osp, and so that export can check a folder's weights
against it before writing.
"""
