"""``python -m celery_cluster node ...``"""

from .cli import main

main()
