"""Built-in strategies; importing this package registers them."""
from strategies import finetune, linear  # noqa: F401
