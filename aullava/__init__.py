"""aullava: facial Action Units written by a language model (an open take on AU-LLaVA, arXiv 2409.08444)."""
__version__ = "0.1.0"
