"""The driver: the story of a run from the command line to the exported model.

``run`` (launch_local, launch_ray: config saved, model checked, data prepared, resume decided, workers
started, summary written), ``prepare`` (which runner prepares the data), ``ray_session`` (this launch's
Ray), ``ray_train`` (placement, the worker group, failures), ``worker`` (the entry every Ray worker runs),
``ray_data`` (data preparation on Ray Data), ``stop`` (SIGTERM/SIGINT to a checkpointed end),
``dry_run`` (the plan without a cluster).

May import every other package; nothing but ``cli`` imports this one (the worker side never does).
"""
