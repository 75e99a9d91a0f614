"""Built-in strategies; importing this package registers them."""
from clframe.strategies import adapter, bitfit, cocoop, coda_prompt, coop, dapl, derpp, dualprompt, er, ewc, finetune, gdumb, icarl, l2p, linear, lwf, mlp_k, partial_k, prefix, side_tuning, vpt_deep, vpt_shallow, zeroshot_clip  # noqa: F401,E501
from clframe.strategies import aper, ease, ranpac, simplecil, slca  # noqa: F401 - pre-trained-model baselines (issue 22)
