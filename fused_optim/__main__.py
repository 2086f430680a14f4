"""python -m fused_optim: prints which kernel runs each op on each device, and how it was built."""

import json

from . import backend_info

print(json.dumps(backend_info(), indent=2))
