"""Built-in scenarios; importing this package registers them."""
from scenarios import split_cifar100, split_digits  # noqa: F401
