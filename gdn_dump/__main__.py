"""``python -m gdn_dump`` (what ``torchrun -m gdn_dump extract ...`` runs)."""

from .cli.app import main

main()
