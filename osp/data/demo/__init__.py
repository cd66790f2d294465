"""The demo corpus (Austen + a public-domain bible from Debian packages) and its pure-Python extractors."""

from osp.data.demo.corpus import DemoCorpus

__all__ = ["DemoCorpus"]
