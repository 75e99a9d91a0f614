"""Built-in strategies; importing this package registers them."""
from strategies import adapter, bitfit, finetune, linear, mlp_k, partial_k, prefix, side_tuning, vpt_deep, vpt_shallow  # noqa: F401,E501
