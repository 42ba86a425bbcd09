"""The ``fedmae`` command, the composition root: the only code that imports both roles.

One module per command family (``main`` assembles the parser); each has a ``build(sub)``
that adds its subcommands and imports its heavy dependencies (torch, the roles) only
inside the command functions, so ``fedmae --help`` and the admin commands start fast.
"""

# The update encodings a flag may name (fedmae.tensor_codec maps them; it loads torch).
ENCODING_NAMES = ["fp32", "fp16", "bf16", "int8"]
