"""Built-in tasks (fflnode.train.task.BUILTIN_TASKS), each a plain Task like a user's."""
