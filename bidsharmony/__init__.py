"""bidsharmony: blind harmonization of T1-weighted MRI with a normalizing-flow prior, as a BIDS-App."""

__version__ = "0.1.0"
__all__ = ["__version__"]
