"""fedspa: personalized federated learning with sparse local models (FedSpa) on fedspa_kernels."""

__version__ = "0.1.0"
