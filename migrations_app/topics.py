"""The live-update topics this app announces (``live.outbox.announce``). Its pages (``live.py``) say
which of them concern each page; the writers (actions, events, the follower) announce them."""

JOB = "job"  # a job's state, step or event; key: the job
PROGRESS = "progress"  # only a job's bytes and rates; key: the job
INVENTORY = "inventory"  # the VMA's inventory was read again
GROUP = "group"  # a migration group's settings or members changed; key: the group
