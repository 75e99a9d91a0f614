"""Built-in strategies; importing this package registers them."""
from clframe.strategies import adapter, bitfit, cocoop, coda_prompt, coop, dapl, dualprompt, finetune, l2p, linear, mlp_k, partial_k, prefix, side_tuning, vpt_deep, vpt_shallow, zeroshot_clip  # noqa: F401,E501
