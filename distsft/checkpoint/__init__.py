from distsft.checkpoint.store import *  # noqa: F401,F403
