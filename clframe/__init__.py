"""clframe: continual-learning experiments with prompt-based and PEFT strategies on timm ViTs."""
__version__ = "0.1.0"
