"""Built-in scenarios; importing this package registers them."""
from clframe.scenarios import (avalanche_streams, core50, digits_domains, folders, split_cifar100,  # noqa: F401
                       split_digits)
